"""Image loading: :func:`decode_sample`, the one way a sample (file, URL, bytes or picture) becomes a uint8 tensor
at the model's size, and :class:`ImageFiles`, which runs it in DataLoader workers over a run's files (or hands
plain JPEGs' bytes to the GPU decoder), in batches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch.utils.data import Dataset

from models.data import DataConfig, resize
from satcli.captioning.sources.local import BAD_NAME, utf8_name
from satcli.captioning.sources.remote import is_url, read_url
from satcli.captioning.sources.sample import Sample
from satcli.core.errors import SatcliError
from satcli.data.feed import JpegBytes, read_jpeg
from satcli.data.images import ImageError, load_image, load_picture

Loaded = tuple[torch.Tensor | None, int | None, int | None, str | None]  # image, width, height, error


def decode_sample(sample: Sample, data: DataConfig, max_pixels: int | None) -> Loaded:
    """A sample → (uint8 (3, S, S) tensor, original width, height, None), or (None, width, height, error) when
    it cannot be used: the same opening (EXIF, modes, pixel limit, :mod:`satcli.data.images`) and the same
    resize (the model's :class:`~models.data.DataConfig`) for files, URLs, bytes and pictures alike."""
    if sample.error is not None:
        return None, None, None, sample.error
    try:
        if sample.image is not None:
            loaded = load_picture(sample.image, max_pixels)
        else:
            source = sample.data
            if source is None and sample.file is not None:
                source = read_url(sample.file, sample.storage_options) if is_url(sample.file) else sample.file
            if source is None:
                return None, None, None, "no-image: the sample carries no image"
            loaded = load_image(source, max_pixels, min_size=data.image_size)
        return resize(loaded.image, data), loaded.width, loaded.height, None
    except ImageError as error:
        return None, error.width, error.height, str(error)
    except SatcliError as error:  # a URL that could not be read
        return None, None, None, f"unreadable: {error}"
    except Exception as error:  # noqa: BLE001 — one strange file must not end a long run
        return None, None, None, f"failed: {type(error).__name__}: {str(error)[:200]}"


class ImageFiles(Dataset):
    """Image files → ``(index, uint8 (3, S, S) or None, width, height, error)``.

    With ``jpeg_bytes``, plain JPEGs come back undecoded (:class:`satcli.data.feed.JpegBytes`) for the GPU decoder.
    File names live in one Arrow array, not a Python list: forked workers then share its pages instead of
    copying them one reference count at a time (which makes DataLoader memory grow with the number of files).
    """

    def __init__(self, files: Sequence[str], data: DataConfig, max_pixels: int | None, jpeg_bytes: bool = False,
                 storage_options: Mapping[str, Any] | None = None):
        # A name that is not UTF-8 cannot go into Arrow (nor into the results): it becomes a bad-name row.
        self.files = pa.array([file if utf8_name(file) else None for file in files], pa.string())
        self.data = data
        self.max_pixels = max_pixels
        self.jpeg_bytes = jpeg_bytes
        self.storage_options = storage_options  # for files that are URLs

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | JpegBytes | None, int | None, int | None,
                                               str | None]:
        if self.jpeg_bytes and self.files[index].is_valid and not is_url(self.files[index].as_py()):
            try:
                raw = read_jpeg(self.files[index].as_py(), self.max_pixels)
            except ImageError as error:
                return index, None, error.width, error.height, str(error)
            if raw is not None:
                return index, raw, raw.width, raw.height, None
        return self.load(index)

    def load(self, index: int) -> tuple[int, torch.Tensor | None, int | None, int | None, str | None]:
        """Decode on the CPU, whatever the file."""
        file = self.files[index].as_py()
        if file is None:
            return index, None, None, None, BAD_NAME
        return index, *decode_sample(Sample(file, file=file, storage_options=self.storage_options), self.data,
                                     self.max_pixels)


def lower_priority(worker_id: int) -> None:
    """Used when the model runs on the CPU, where the workers share the cores with it: at a lower priority they
    decode mostly in the cycles the model leaves free instead of preempting one of its threads mid-operation
    (which stalls the others at the next barrier). When the model waits for images they get the CPU anyway."""
    with contextlib.suppress(OSError):
        os.nice(10)


@dataclass
class Batch:
    """Images from the workers, in the order of their indices; the ones that failed carry only an error."""

    indices: list[int]
    images: torch.Tensor  # (n_ok, 3, S, S) uint8, the images that loaded
    loaded: list[bool]
    widths: list[int | None]
    heights: list[int | None]
    errors: list[str | None]
    jpegs: dict[int, torch.Tensor] = field(default_factory=dict)  # position → JPEG bytes, for the GPU decoder

    def pin_memory(self) -> Batch:  # called by the DataLoader's pinning thread on CUDA
        self.images = self.images.pin_memory()
        return self


def collate(items: list[tuple]) -> Batch:
    """DataLoader items of :class:`ImageFiles` → one :class:`Batch` (the images that loaded stacked)."""
    images = [image for _, image, _, _, _ in items if isinstance(image, torch.Tensor)]
    jpegs = {position: item[1].data for position, item in enumerate(items) if isinstance(item[1], JpegBytes)}
    stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
    return Batch([i for i, *_ in items], stacked, [image is not None for _, image, *_ in items],
                  [w for *_, w, _, _ in items], [h for *_, h, _ in items], [e for *_, e in items], jpegs)
