"""What the engine adapters share: an engine's batch of images → satcli samples → satcli's results table.

A batch is a dict of numpy arrays or lists (Ray's ``numpy`` format), a pandas DataFrame, or a pyarrow Table /
RecordBatch (Ray's ``pyarrow`` format, Spark's ``mapInArrow``). One column holds the pictures:

- encoded image bytes (img2dataset's ``jpg`` column, WebDataset's ``jpg``/``png``/``webp`` members, Ray's
  ``read_binary_files`` ``bytes`` column),
- a ``struct<bytes, path>`` (Hugging Face datasets' ``image``),
- a path or URL string (read on the worker; ``storage_options`` open URLs),
- or a decoded H×W×C uint8 array (Ray's ``read_images``);

by default the first of :data:`IMAGE_COLUMNS` the batch has. The sample's ``key`` comes from ``key`` /
``__key__`` (or ``key_column``), its ``shard`` from a ``shard`` column, the results' ``path`` from a ``path``
column when the pictures are bytes (else the path, or ``SHARD#KEY``, or the key). The other short scalar
columns (a caption, a URL, a width ...) are carried into ``source_meta`` as JSON, as Parquet inputs do.

:class:`BatchCaptioner` loads the model once and captions batch after batch through
:func:`satcli.captioning.samples.caption_samples`, the path ``satcli caption`` takes: the same image opening,
preprocessing, batched beam search and row builder, so the rows are ``satcli caption``'s. Every input row gives
one output row, in order; a picture that cannot be read is an error row, never a failed batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from satcli.captioning.options import CaptionOptions, decoding_options
from satcli.captioning.samples import Sample, caption_samples, load_for_captioning, rows_table
from satcli.captioning.sources.parquet import IMAGE_COLUMNS as PARQUET_IMAGE_COLUMNS
from satcli.captioning.sources.parquet import KEY_COLUMNS
from satcli.captioning.sources.remote import is_url
from satcli.core.errors import SatcliError
from satcli.core.threads import configure_threads
from satcli.data.images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

IMAGE_COLUMNS = (*PARQUET_IMAGE_COLUMNS, "bytes", "path")  # + Ray's read_binary_files / a column of paths
DECODING_FIELDS = ("beam_size", "max_length", "length_penalty", "n_best", "no_repeat_ngram_size", "min_length",
                   "allow_unk")


def batch_columns(batch: Any) -> dict[str, list[Any]]:
    """A numpy dict, pandas DataFrame or pyarrow Table/RecordBatch → column name → Python values."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, pa.Table):
        return {name: _arrow_values(batch.column(name)) for name in batch.column_names}
    if hasattr(batch, "columns") and hasattr(batch, "iloc"):  # pandas, without importing it
        return {str(name): batch[name].tolist() for name in batch.columns}
    if isinstance(batch, Mapping):
        return {str(name): list(values) for name, values in batch.items()}
    raise TypeError(f"a batch is a dict of arrays, a pandas DataFrame or a pyarrow Table, not {type(batch).__name__}")


def _arrow_values(column: pa.ChunkedArray) -> list[Any]:
    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor columns: one ndarray per row
        return list(column.combine_chunks().to_numpy())
    return column.to_pylist()


def batch_samples(batch: Any, column: str | None = None, key_column: str | None = None,
                  path_column: str | None = None, storage_options: Mapping[str, Any] | None = None) -> list[Sample]:
    """The rows of an engine's batch as samples, in order (the module docstring says which columns mean what)."""
    values = batch_columns(batch)
    image = _pick(values, column, IMAGE_COLUMNS, "image")
    key = _pick(values, key_column, KEY_COLUMNS, "key", required=False)
    path = _pick(values, path_column, ("path",), "path", required=False) if image != "path" else None
    shard = "shard" if "shard" in values else None
    used = {image, key, path, shard}
    carried = [name for name in values if name not in used]
    n_rows = len(values[image])
    samples = []
    for i in range(n_rows):
        sample_key = None if key is None or values[key][i] is None else str(_plain(values[key][i]))
        sample_shard = None if shard is None or values[shard][i] is None else str(values[shard][i])
        meta = {name: _plain(values[name][i]) for name in carried if _scalar(values[name][i])}
        shown = values[path][i] if path is not None else None
        samples.append(_sample(values[image][i], sample_key, sample_shard, shown, meta or None, storage_options))
    return samples


def _pick(values: Mapping[str, list], named: str | None, candidates: tuple[str, ...], what: str,
          required: bool = True) -> str | None:
    if named is not None:
        if named not in values:
            raise SatcliError(f"the batch has no {what} column {named!r} (it has: {', '.join(values)})")
        return named
    found = next((name for name in candidates if name in values), None)
    if found is None and required:
        raise SatcliError(f"the batch has no image column ({'/'.join(candidates)}); name it with column=... "
                          f"(it has: {', '.join(values)})")
    return found


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | np.generic | dict) and not isinstance(value, bytes)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _sample(value: Any, key: str | None, shard: str | None, shown: Any, meta: dict[str, Any] | None,
            storage_options: Mapping[str, Any] | None) -> Sample:
    """One row's picture → a Sample (bytes, a struct of bytes and path, a path or URL, or a decoded array)."""
    name = str(shown) if shown is not None else (f"{shard}#{key}" if shard and key else key)
    if isinstance(value, dict):  # Hugging Face's image struct
        data, inner = value.get("bytes"), value.get("path")
        value = data if data else inner
        name = name or (str(inner) if inner else None)
    if isinstance(value, str):
        return Sample(name or value, file=value, key=key, shard=shard, meta=meta,
                      storage_options=storage_options if is_url(value) else None)
    if isinstance(value, bytes | bytearray | memoryview) and len(value):
        return Sample(name or "", data=bytes(value), key=key, shard=shard, meta=meta)
    if isinstance(value, np.ndarray | list) and np.ndim(value) in (2, 3):
        from PIL import Image

        try:
            return Sample(name or "", image=Image.fromarray(np.asarray(value, dtype=np.uint8)), key=key,
                          shard=shard, meta=meta)
        except (TypeError, ValueError) as error:
            return Sample(name or "", key=key, shard=shard, meta=meta, error=f"not-an-image: {error}")
    return Sample(name or "", key=key, shard=shard, meta=meta, error="no-image: the row holds no image")


def set_threads(n_threads: int | None) -> None:
    """Torch's intra-op threads in this worker (:mod:`satcli.core.threads`): ``n_threads`` when given, else one
    per actor or task unless the engine or the user set ``OMP_NUM_THREADS`` or ``SATCLI_THREADS``."""
    configure_threads(n_threads, engine=True)


class BatchCaptioner:
    """A captioner for an engine's workers: the model loaded once (in ``__init__``), then one results table per
    batch (``caption(batch)``: satcli's results schema, one row per input row, in order).

    ``model``: a checkpoint path every worker can read. ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    ``decoding``: ``satcli caption``'s options (``beam_size=3``, ``max_length``, ``length_penalty``, ``n_best``,
    ``no_repeat_ngram_size``, ``min_length``, ``allow_unk``), with its defaults. ``batch_size``: images per
    forward pass (a larger engine batch is captioned in such pieces). ``threads``: torch threads and decode
    threads of this worker (default 1: one per CPU the engine gives it). ``column``, ``key_column``,
    ``path_column``: the batch's columns (see :func:`batch_samples`); ``storage_options`` open URLs.
    """

    def __init__(self, model: str | Path, *, device: str = "auto", batch_size: int = 32, threads: int | None = 1,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, column: str | None = None,
                 key_column: str | None = None, path_column: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, **decoding: Any):
        unknown = sorted(set(decoding) - set(DECODING_FIELDS))
        if unknown:
            raise SatcliError(f"unknown decoding option {unknown[0]!r} (known: {', '.join(DECODING_FIELDS)})")
        if batch_size < 1:
            raise SatcliError(f"batch_size must be at least 1, got {batch_size}")
        options = CaptionOptions(inputs=(), **{f.name: decoding[f.name] for f in fields(CaptionOptions)
                                               if f.name in decoding})
        self.decoding = decoding_options(options)
        self.batch_size = batch_size
        self.threads = threads
        self.max_pixels = max_pixels
        self.columns = {"column": column, "key_column": key_column, "path_column": path_column}
        self.storage_options = storage_options
        set_threads(threads)
        self.loaded = load_for_captioning(model, device)
        log.info("satcli captioner ready: %s on %s", model, self.loaded.model.device)

    def caption(self, batch: Any) -> pa.Table:
        """One batch (numpy dict, pandas or pyarrow) → a pyarrow Table in satcli's results schema."""
        return self.caption_samples(batch_samples(batch, storage_options=self.storage_options, **self.columns))

    def caption_samples(self, samples: list[Sample] | Iterator[Sample]) -> pa.Table:
        """Samples → their results table (rows in order)."""
        rows = caption_samples(self.loaded, samples, self.decoding, self.batch_size, max_pixels=self.max_pixels,
                               n_threads=self.threads)
        return rows_table(rows)
