"""The one decode-and-caption path: samples (bytes, files, URLs or pictures, from any source) → result rows.

``satcli caption`` over shards, the Python API (``satcli.load(...).caption``) and the engine adapters (Ray
Data, Spark) all caption through :func:`caption_samples`, so they all give the rows ``satcli caption`` gives:
the same image opening (:func:`satcli.captioning.loading.decode_sample`: EXIF, modes, the pixel limit), the
same preprocessing (the checkpoint's :class:`~models.data.DataConfig`), the same batched beam search
(:func:`satcli.captioning.model.caption_batch`) and the same row builder
(:func:`satcli.formats.results.result_row`). A sample that cannot be read is an error row, never an exception.

    loaded = load_for_captioning("runs/x/best.pt", device="cpu")
    rows = caption_samples(loaded, [Sample("a.jpg", data=jpeg_bytes, key="a")], DecodingOptions(beam_size=3))
    table = rows_table(rows)  # pyarrow, satcli's results schema (satcli.formats.results.SCHEMA)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from models.decoding import DecodingOptions
from satcli.captioning.loading import Loaded, decode_sample
from satcli.captioning.model import caption_batch, prepare_model
from satcli.captioning.sources.sample import Sample
from satcli.core.device import resolve_device
from satcli.data.feed import n_cpus
from satcli.data.images import DEFAULT_MAX_PIXELS
from satcli.formats.checkpoint import LoadedCheckpoint, load_captioner
from satcli.formats.results import CaptionRow, result_row, to_table

__all__ = ["Sample", "caption_samples", "load_for_captioning", "rows_table"]


def load_for_captioning(checkpoint: str | Path, device: str | torch.device = "auto") -> LoadedCheckpoint:
    """A checkpoint loaded for :func:`caption_samples`: its model in eval mode on ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``). Load once per process (a Ray actor, a Spark worker), caption many batches."""
    resolved = device if isinstance(device, torch.device) else resolve_device(device)
    loaded = load_captioner(Path(checkpoint), resolved)
    loaded.model = prepare_model(loaded.model, resolved)
    return loaded


def caption_samples(loaded: LoadedCheckpoint, samples: Iterable[Sample], decoding: DecodingOptions,
                    batch_size: int = 32, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    n_threads: int | None = None) -> Iterator[CaptionRow]:
    """Caption ``samples`` in batches of ``batch_size``: one :class:`~satcli.formats.results.CaptionRow` per
    sample, in order, lazily (a batch is read and decoded while the one before it is captioned).

    ``loaded``: from :func:`load_for_captioning` (the model on its device). ``decoding``: the beam search
    (``models.decoding.DecodingOptions``; ``satcli.captioning.options.decoding_options`` builds the CLI's).
    ``n_threads``: decoding threads (None: the CPUs, at most 4). A row's ``error`` says why a sample could not
    be captioned (``kind: reason``); the run never stops for one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    data = loaded.preprocessing
    words = loaded.vocab.words
    batches = _batched(iter(samples), batch_size)
    with ThreadPoolExecutor(n_threads or min(4, n_cpus())) as pool:
        def submit(batch: list[Sample]) -> list[Future[Loaded]]:
            return [pool.submit(decode_sample, sample, data, max_pixels) for sample in batch]

        pending = next(batches, None)
        decoding_now = submit(pending) if pending is not None else []
        while pending is not None:
            batch, decoded = pending, [future.result() for future in decoding_now]
            pending = next(batches, None)
            decoding_now = submit(pending) if pending is not None else []  # overlaps with the captioning below
            yield from caption_decoded(loaded, batch, decoded, decoding, words)


def caption_decoded(loaded: LoadedCheckpoint, batch: Sequence[Sample], decoded: Sequence[Loaded],
                    decoding: DecodingOptions, words: Sequence[str]) -> list[CaptionRow]:
    """One batch of decoded samples (:func:`~satcli.captioning.loading.decode_sample`'s results) → its rows."""
    images = [image for image, *_ in decoded if image is not None]
    results = iter(caption_batch(loaded.model, torch.stack(images), loaded.preprocessing, decoding)) \
        if images else iter(())
    return [result_row(sample.path, next(results) if image is not None else None, words, decoding.n_best,
                       width, height, error, key=sample.key, shard=sample.shard, source_meta=sample.source_meta)
            for sample, (image, width, height, error) in zip(batch, decoded, strict=True)]


def rows_table(rows: Iterable[CaptionRow], metadata: dict[str, Any] | None = None) -> pa.Table:
    """Result rows → a pyarrow table with satcli's one results schema (``satcli.formats.results.SCHEMA``)."""
    return to_table(list(rows), metadata)


def _batched(items: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while batch := list(itertools.islice(items, size)):
        yield batch
