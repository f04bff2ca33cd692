"""One call from Python: ``satcli.load("runs/x/best.pt").caption(["a.jpg", "b.png"], beam_size=3)``.

The same images, model and decoding as ``satcli caption`` (the one decode-and-caption path,
:func:`satcli.captioning.samples.caption_samples`: the same image opening, preprocessing and batched beam
search, ``<unk>`` banned unless ``allow_unk=True``), without the Parquet file: one dict per image, in order.

``caption`` takes what people have: paths, folders and glob patterns as the CLI does (URLs and tar/Parquet
shards too), PIL images, numpy arrays (H×W or H×W×C, uint8 or floats in [0, 1]; N×H×W×C for several), torch
tensors (C×H×W as torchvision makes them; N×C×H×W for several), encoded image bytes, or any iterable of these.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.decoding import DecodingOptions
from satcli.captioning.samples import caption_samples, load_for_captioning
from satcli.captioning.sources import Sample, find_inputs
from satcli.captioning.sources.local import BAD_NAME, utf8_name
from satcli.captioning.sources.remote import is_url
from satcli.core.console import make_progress
from satcli.core.defaults import default_model
from satcli.core.errors import SatcliError
from satcli.data.images import DEFAULT_MAX_PIXELS
from satcli.data.vocab import banned_words
from satcli.formats.checkpoint import LoadedCheckpoint
from satcli.formats.results import CaptionRow

IN_MEMORY = "<in memory>"  # the path of a picture given as bytes, an array or a PIL image (None in the results)


@dataclass
class CaptionPipeline:
    """A loaded captioner on its device. ``caption(inputs, **decoding)`` → one dict per image."""

    checkpoint: LoadedCheckpoint
    device: torch.device
    batch_size: int = 32
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @property
    def model(self):
        return self.checkpoint.model

    def caption(self, inputs: Any, *, batch_size: int | None = None, progress: bool = False,
                **decoding: Any) -> list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Caption images. ``inputs``: one input or a list of them (the module docstring lists the kinds) →
        a list of dicts; any other iterable (a generator, a dataset) → an iterator yielding them lazily, a
        batch at a time. ``batch_size``: images per batch for this call (default: the one given to
        :func:`load`); ``progress``: show a progress bar on stderr. ``decoding``:
        :class:`models.decoding.DecodingOptions` fields (``beam_size=3``, ``max_length``, ``length_penalty``,
        ``n_best``, ``no_repeat_ngram_size``, ``min_length``) and ``allow_unk``.

        Each dict: ``path`` (as given, or as found under a folder; None for a picture in memory), ``caption``
        (str), ``words`` (list of str), ``word_probs`` (each word's probability), ``sum_logprob``,
        ``finished``, ``attention`` (float32 numpy array (n_words, H, W), each grid summing to 1),
        ``alternatives`` (with ``n_best`` > 1: the runners-up as dicts of ``caption``, ``sum_logprob``,
        ``finished``), ``key`` and ``shard`` (for samples of tar/Parquet shards) and ``error`` (None, or why the
        image could not be captioned, as ``kind: reason``; the other fields are then None).
        """
        results = self.stream(inputs, batch_size=batch_size, progress=progress, **decoding)
        if _one_input(inputs) or isinstance(inputs, Sequence | np.ndarray | torch.Tensor):
            return list(results)
        return results

    def stream(self, inputs: Any, *, batch_size: int | None = None, progress: bool = False,
               **decoding: Any) -> Iterator[dict[str, Any]]:
        """:meth:`caption`, always lazy: results are yielded as their batch is captioned."""
        options = _decoding(decoding)
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise SatcliError(f"batch_size must be at least 1, got {size}")
        items = [inputs] if _one_input(inputs) or isinstance(inputs, np.ndarray | torch.Tensor) else inputs
        total = len(items) if isinstance(items, Sequence) and all(_single_file(i) for i in items) else None
        rows = caption_samples(self.checkpoint, _samples(items), options, size, max_pixels=self.max_pixels)
        return _with_progress((result_dict(row) for row in rows), total) if progress else \
            (result_dict(row) for row in rows)


def load(checkpoint: str | Path | None = None, device: str = "auto", batch_size: int = 32) -> CaptionPipeline:
    """A captioner ready to use: ``satcli.load("runs/x/best.pt").caption(["a.jpg"])``.

    ``checkpoint`` None: ``$SATCLI_MODEL``, else the model of the most recent ``satcli train`` (as the CLI).
    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """
    loaded = load_for_captioning(Path(checkpoint) if checkpoint is not None else default_model(), device)
    return CaptionPipeline(loaded, loaded.model.device, batch_size)


def result_dict(row: CaptionRow) -> dict[str, Any]:
    """A results row → the API's dict (the module docstring of :meth:`CaptionPipeline.caption` lists the keys)."""
    ok = row.error is None
    return {
        "path": None if row.path == IN_MEMORY else row.path,
        "caption": row.caption, "words": row.tokens,
        "word_probs": [float(np.exp(v)) for v in row.token_logprobs] if ok and row.token_logprobs is not None
        else None,
        "sum_logprob": None if row.sum_logprob is None else float(row.sum_logprob), "finished": row.finished,
        "attention": row.attention,
        "alternatives": None if row.alternatives is None else
        [{"caption": c, "sum_logprob": float(s), "finished": f} for c, s, f in row.alternatives],
        "key": row.key, "shard": row.shard, "error": row.error,
    }


def _decoding(decoding: dict[str, Any]) -> DecodingOptions:
    allow_unk = bool(decoding.pop("allow_unk", False))
    try:
        return DecodingOptions(**{"beam_size": 3, "banned_ids": banned_words(allow_unk), **decoding})
    except (TypeError, ValueError) as error:
        raise SatcliError(str(error)) from None


def _one_input(value: Any) -> bool:
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.ndim < 4
    return isinstance(value, str | Path | bytes | bytearray | memoryview | Image.Image)


def _single_file(value: Any) -> bool:
    """Whether an input is exactly one picture (so the progress bar knows its total)."""
    if isinstance(value, str | Path):
        text = str(value)
        return not (is_url(text) or glob.has_magic(text) or "{" in text or os.path.isdir(text))
    return _one_input(value)


def _samples(items: Iterable[Any]) -> Iterator[Sample]:
    for item in items:
        if isinstance(item, np.ndarray | torch.Tensor) and item.ndim == 4:
            for one in item:
                yield Sample(IN_MEMORY, image=to_picture(one))
        elif isinstance(item, str | Path):
            yield from _path_samples(str(item))
        elif isinstance(item, bytes | bytearray | memoryview):
            yield Sample(IN_MEMORY, data=bytes(item))
        elif isinstance(item, Image.Image):
            yield Sample(IN_MEMORY, image=item)
        elif isinstance(item, np.ndarray | torch.Tensor):
            yield Sample(IN_MEMORY, image=to_picture(item))
        else:
            raise SatcliError(f"cannot caption a {type(item).__name__}: give paths, folders, globs, URLs, PIL "
                              "images, numpy arrays, tensors or image bytes")


def _path_samples(text: str) -> Iterator[Sample]:
    if not _single_file(text):
        found = find_inputs([text])
        for source in found.images:
            yield Sample(source.path, file=source.file)
        for shard in found.shards:
            yield from shard.samples()
    elif not utf8_name(text):
        yield Sample(text.encode("utf-8", "backslashreplace").decode("utf-8"), error=BAD_NAME)
    else:
        yield Sample(text, file=text)


def to_picture(array: np.ndarray | torch.Tensor) -> Image.Image:
    """An image array → a PIL picture: numpy H×W or H×W×C (C = 1, 3 or 4), torch C×H×W; uint8, or floats in [0, 1]
    (rounded to 8 bits as a PNG of them would be)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.permute(1, 2, 0) if array.ndim == 3 else array).numpy()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise SatcliError(f"an image array must be H×W or H×W×C with C 1, 3 or 4 (tensors C×H×W); got shape "
                          f"{tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise SatcliError(f"an image array must be uint8 or floats in [0, 1]; got {array.dtype}")
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _with_progress(results: Iterator[dict[str, Any]], total: int | None) -> Iterator[dict[str, Any]]:
    progress = make_progress()
    with progress:
        task = progress.add_task("captioning", total=total, unit="images")
        for result in results:
            progress.advance(task)
            yield result
