"""Keeping the device fed: how many decode workers, and JPEGs decoded on the GPU.

On a GPU the encoder and the batched beam search are fast enough that decoding JPEGs on the CPU is the limit.
So, when the model runs on CUDA:

- more DataLoader workers decode (up to 8, one core left to the main process), and batches arrive in pinned
  memory so that the copy to the GPU is asynchronous (``non_blocking``);
- plain JPEGs are not decoded in the workers at all: a worker reads the file's bytes and its header (size
  limit, EXIF orientation, colour mode), and the main process decodes the whole batch at once with nvJPEG
  (``torchvision.io.decode_jpeg(..., device="cuda")``), then resizes on the GPU with the model's own filter;
- everything else takes the CPU path unchanged: other formats, CMYK or rotated JPEGs, and any JPEG the GPU
  decoder refuses, which is then decoded on the CPU by the same code as always, so a bad file still becomes
  the same error row.

``SATCLI_GPU_JPEG=0`` turns the GPU decoder off (every image decoded in the workers, as on a CPU).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from models.data import DataConfig, resize
from satcli.data.images import ImageError

log = logging.getLogger(__name__)

MAX_GPU_WORKERS = 8
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


def n_cpus() -> int:
    """The CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: torch.device | None = None) -> int:
    """Decode workers: min(4, CPUs) when the model shares the CPUs; on a GPU up to 8, one CPU left to the main
    process (never fewer than on a CPU)."""
    n = n_cpus()
    if device is not None and device.type == "cuda":
        return max(min(4, n), min(MAX_GPU_WORKERS, n - 1))
    return min(4, n)


def jpeg_decode_device(device: torch.device) -> torch.device | None:
    """Where plain JPEGs are decoded in the main process: the GPU itself when the model runs on CUDA (unless
    ``SATCLI_GPU_JPEG=0``), else nowhere (None: the workers decode every image)."""
    if device.type == "cuda" and os.environ.get("SATCLI_GPU_JPEG", "1") != "0":
        return device
    return None


@dataclass
class JpegBytes:
    """A JPEG a worker did not decode: its bytes (1-D uint8) and its size from the header."""

    data: torch.Tensor
    width: int
    height: int


def read_jpeg(file: str, max_pixels: int | None) -> JpegBytes | None:
    """A plain JPEG's bytes for the GPU decoder, or None when the file should take the CPU path.

    Only baseline-looking, complete (ending in EOI), RGB or greyscale JPEGs without a rotating EXIF orientation
    qualify; anything doubtful returns None, so the CPU loader decides (and names the error). Raises
    :class:`ImageError` only for a JPEG over ``max_pixels``, exactly as the CPU loader would.
    """
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError:
        return None  # the CPU loader names the problem
    if not data.startswith(_JPEG_START) or not data.rstrip(b"\0\r\n ").endswith(_JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:  # the header only: nothing is decoded
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None
                if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    return None
                width, height = im.size
    except Exception:  # noqa: BLE001 — whatever it is, the CPU loader says it better
        return None
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError("too-large", f"{width}×{height} is {width * height:,} pixels, over the limit of "
                                      f"{max_pixels:,} (raise it with --max-pixels)", width, height)
    return JpegBytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), width, height)


def decode_jpegs(data: list[torch.Tensor], config: DataConfig, device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes → uint8 (3, S, S) on ``device`` (resized as ``config`` says, by :func:`models.data.resize`),
    None where decoding failed.

    The whole list goes to the decoder at once (nvJPEG's batched path on CUDA); if it refuses the batch, each
    image is tried alone so that one bad file costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice and corrupt-data warnings
            decoded: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = []
        for one in data:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as error:
                log.debug("GPU JPEG decoding failed (%s); the CPU loader takes the file", error)
                decoded.append(None)
    return [None if image is None else resize(image, config) for image in decoded]


class _FedBatch(Protocol):
    """What :func:`images_on_device` reads and updates (``satcli.captioning``'s batches)."""

    indices: list[int]
    images: torch.Tensor
    loaded: list[bool]
    widths: list[int | None]
    heights: list[int | None]
    errors: list[str | None]
    jpegs: dict[int, torch.Tensor]


LoadOnCpu = Callable[[int], tuple[int, "torch.Tensor | None", "int | None", "int | None", "str | None"]]


def images_on_device(batch: _FedBatch, config: DataConfig, device: torch.device, load_on_cpu: LoadOnCpu
                     ) -> torch.Tensor:
    """The batch's loaded images, in batch order, as uint8 (n_loaded, 3, S, S) on ``device``.

    Pixels decoded by the workers are copied (non-blocking from pinned memory); the JPEG bytes are decoded on
    ``device`` in one call. A JPEG the decoder refuses is loaded by ``load_on_cpu(index)`` (the workers' own CPU
    path), and the batch's ``loaded``/``errors``/sizes are updated from it: a bad file is an error row as always.
    """
    decoded = dict(zip(batch.jpegs, decode_jpegs(list(batch.jpegs.values()), config, device), strict=True))
    pixels = iter(batch.images.to(device, non_blocking=True))
    images = []
    for position, index in enumerate(batch.indices):
        if not batch.loaded[position]:
            continue
        if position not in decoded:
            images.append(next(pixels))
            continue
        image = decoded[position]
        if image is None:
            _, cpu_image, width, height, error = load_on_cpu(index)
            batch.widths[position], batch.heights[position], batch.errors[position] = width, height, error
            batch.loaded[position] = cpu_image is not None
            if cpu_image is None:
                continue
            image = cpu_image.to(device)
        images.append(image)
    if not images:
        return torch.empty(0, 3, config.image_size, config.image_size, dtype=torch.uint8, device=device)
    return torch.stack(images)
