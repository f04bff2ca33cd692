"""Results files: one Parquet row per image, the schema defined once, and the only code that builds, writes and
reads such rows and their metadata (``satcli caption`` and ``satcli evaluate`` both use it).

docs/formats.md documents every column and metadata key (a test checks that a caption results file and an
evaluate predictions file hold exactly those); :func:`read_metadata` returns the metadata parsed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from satcli.core.atomic import disk_error, fsync_directory, temp_path
from satcli.core.errors import SatcliError, first_line
from satcli.core.version import __version__
from satcli.data.text import detokenize

if TYPE_CHECKING:  # reading results needs no torch: these types only annotate the writers' arguments
    from models.decoding import DecodingOptions, DecodingResult
    from satcli.formats.checkpoint import LoadedCheckpoint

SCHEMA_VERSION = 1

SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("tokens", pa.list_(pa.string())),
    pa.field("sum_logprob", pa.float32()),
    pa.field("finished", pa.bool_()),
    pa.field("attention", pa.list_(pa.list_(pa.float32()))),
    pa.field("grid_height", pa.int32()),
    pa.field("grid_width", pa.int32()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("error", pa.string()),
    pa.field("alternatives", pa.list_(pa.struct([("caption", pa.string()), ("sum_logprob", pa.float32()),
                                                   ("finished", pa.bool_())]))),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("source_meta", pa.string()),
    # evaluate's predictions only (null in caption results): the references and the image's own scores
    pa.field("references", pa.list_(pa.string())), pa.field("bleu4", pa.float32()),
    pa.field("cider_d", pa.float32()), pa.field("objects_present", pa.list_(pa.string())),
    pa.field("objects_named", pa.list_(pa.string())),
])
SCORE_COLUMNS = ("references", "bleu4", "cider_d", "objects_present", "objects_named")
# Columns added after the first release: files written before them still read, with the column all null.
_LATER_COLUMNS = ("alternatives", "token_logprobs", "key", "shard", "source_meta", *SCORE_COLUMNS)

ROW_GROUP_SIZE = 512  # rows per Parquet row group in merged files: bounded memory when reading and merging
_COMPRESSION = "zstd"


@dataclass
class CaptionRow:
    """One image's result. Either ``error`` is set, or ``caption``/``tokens``/``attention`` are."""

    path: str
    caption: str | None = None
    tokens: list[str] | None = None
    sum_logprob: float | None = None
    finished: bool | None = None
    attention: np.ndarray | None = None  # (n_tokens, grid_height, grid_width) float32
    image_width: int | None = None
    image_height: int | None = None
    error: str | None = None
    alternatives: list[tuple[str, float, bool]] | None = None  # (caption, sum_logprob, finished): 2nd … Nth
    token_logprobs: list[float] | None = None  # one per token: log P(word | words before it)
    key: str | None = None  # the sample's own key in a sharded dataset (WebDataset __key__, img2dataset key)
    shard: str | None = None  # the input shard it came from (00000.tar)
    source_meta: str | None = None  # JSON: what the source carried along (the sample's .json/.txt, Parquet columns)
    references: list[str] | None = None  # evaluate: the image's reference captions as the dataset has them
    bleu4: float | None = None  # evaluate: this caption's BLEU-4 (0–1) and CIDEr-D (COCO's scale)
    cider_d: float | None = None
    objects_present: list[str] | None = None  # evaluate on a split with objects: labels in the picture
    objects_named: list[str] | None = None  # … and those the caption names


def result_row(path: str, result: DecodingResult | None, words: Sequence[str], n_best: int = 1,
               width: int | None = None, height: int | None = None, error: str | None = None, *,
               key: str | None = None, shard: str | None = None, source_meta: str | None = None) -> CaptionRow:
    """One image's row: the best caption of ``result`` (with ``n_best`` > 1 the runners-up go to
    ``alternatives``), or, when ``result`` is None, a row holding only the image size and ``error``; ``key``,
    ``shard`` and ``source_meta`` say where a sample of a sharded dataset came from."""
    if result is None:
        return CaptionRow(path, image_width=width, image_height=height, error=error, key=key, shard=shard,
                          source_meta=source_meta)
    best = result.best
    tokens = [words[i] for i in best.tokens]
    alternatives = None
    if n_best > 1:
        alternatives = [(detokenize([words[i] for i in h.tokens]), h.sum_logprob, h.finished)
                        for h in result.hypotheses[1:]]
    return CaptionRow(path, detokenize(tokens), tokens, best.sum_logprob, best.finished,
                      best.attention.float().cpu().numpy(), width, height, alternatives=alternatives,
                      token_logprobs=best.token_logprobs, key=key, shard=shard, source_meta=source_meta)


def results_metadata(loaded: LoadedCheckpoint, model_sha256: str, decoding: DecodingOptions, *,
                     image_root: str | None, max_pixels: int | None = None, shard: tuple[int, int] | None = None,
                     fingerprint: dict[str, Any] | None = None,
                     dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """The key-value metadata of a results file (docs/formats.md): the model, the decoding and where the images
    are, for every file; ``satcli.shard`` and ``satcli.fingerprint`` from caption runs, ``satcli.dataset`` from
    evaluate."""
    config = loaded.model.config
    pre = loaded.preprocessing
    metadata: dict[str, Any] = {
        "satcli.version": __version__,
        "satcli.model": {
            "path": None if loaded.path is None else str(loaded.path.absolute()),
            "sha256": model_sha256,
            "encoder": config.encoder,
            "vocab_size": config.vocab_size,
            "config": config.to_dict(),
            "preprocessing": {"image_size": int(pre.image_size), "mean": [float(v) for v in pre.mean],
                              "std": [float(v) for v in pre.std]},
            "train_options": loaded.train_options,
            "metrics": loaded.metrics,
        },
        "satcli.decoding": asdict(decoding),
        # root: where the relative result paths start, so report and overlays find the images from anywhere.
        "satcli.images": {"max_pixels": max_pixels, "root": image_root},
    }
    if dataset is not None:
        metadata["satcli.dataset"] = dataset
    if shard is not None:
        metadata["satcli.shard"] = {"index": shard[0], "count": shard[1]}
    if fingerprint is not None:
        metadata["satcli.fingerprint"] = fingerprint
    return metadata


def to_table(rows: Sequence[CaptionRow], metadata: dict[str, str] | None = None) -> pa.Table:
    """Rows → an Arrow table with :data:`SCHEMA` (and ``metadata`` as its key-value metadata)."""
    n_tokens = [0 if r.attention is None else r.attention.shape[0] for r in rows]
    grids = [(None, None) if r.attention is None else r.attention.shape[1:] for r in rows]
    cells = [0 if h is None else int(h) * int(w) for h, w in grids]
    grids_flat = [r.attention.reshape(-1) for r in rows if r.attention is not None and r.attention.size]
    values = pa.array(np.concatenate(grids_flat).astype(np.float32, copy=False) if grids_flat
                      else np.zeros(0, np.float32))
    inner_offsets = np.zeros(sum(n_tokens) + 1, dtype=np.int32)  # one list per token
    inner_offsets[1:] = np.cumsum(np.repeat(np.asarray(cells, dtype=np.int64), n_tokens))
    outer_offsets = np.zeros(len(rows) + 1, dtype=np.int32)  # one list of tokens per row
    outer_offsets[1:] = np.cumsum(n_tokens)
    missing = np.array([r.attention is None for r in rows], dtype=bool)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), values)
    attention = pa.ListArray.from_arrays(pa.array(outer_offsets), inner, mask=pa.array(missing))
    columns = {
        "path": pa.array([r.path for r in rows], pa.string()),
        "caption": pa.array([r.caption for r in rows], pa.string()),
        "tokens": pa.array([r.tokens for r in rows], pa.list_(pa.string())),
        "sum_logprob": pa.array([r.sum_logprob for r in rows], pa.float32()),
        "finished": pa.array([r.finished for r in rows], pa.bool_()),
        "attention": attention.cast(SCHEMA.field("attention").type),
        "grid_height": pa.array([h for h, _ in grids], pa.int32()),
        "grid_width": pa.array([w for _, w in grids], pa.int32()),
        "image_width": pa.array([r.image_width for r in rows], pa.int32()),
        "image_height": pa.array([r.image_height for r in rows], pa.int32()),
        "error": pa.array([r.error for r in rows], pa.string()),
        "alternatives": pa.array([None if r.alternatives is None else
                                  [{"caption": c, "sum_logprob": lp, "finished": f} for c, lp, f in r.alternatives]
                                  for r in rows], SCHEMA.field("alternatives").type),
        "token_logprobs": pa.array([r.token_logprobs for r in rows], SCHEMA.field("token_logprobs").type),
        "key": pa.array([r.key for r in rows], pa.string()),
        "shard": pa.array([r.shard for r in rows], pa.string()),
        "source_meta": pa.array([r.source_meta for r in rows], pa.string()),
        **{name: pa.array([getattr(r, name) for r in rows], SCHEMA.field(name).type) for name in SCORE_COLUMNS},
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA.with_metadata(_encode(metadata)))


def read_attention(row_or_table: Any, i: int | None = None) -> np.ndarray:
    """The attention of one result as a float32 array of shape (n_tokens, grid_height, grid_width).

    Accepts a ``pyarrow.Table`` (or ``RecordBatch``) with the row index ``i``; a pandas ``DataFrame`` with the
    row position ``i``; or one row on its own: a pandas ``Series``, a ``dict`` (``table.to_pylist()[i]``) or
    a duckdb/namedtuple row with the ``attention``, ``grid_height`` and ``grid_width`` fields. ``grid[t]`` is
    where the model looked while writing ``tokens[t]``. A row with an ``error`` has no attention: the result
    then has shape (0, 0, 0).
    """
    if isinstance(row_or_table, pa.Table | pa.RecordBatch):
        if i is None:
            raise TypeError("read_attention(table, i) needs the row index i")
        row = row_or_table.slice(i, 1)
        height, width = row.column("grid_height")[0].as_py(), row.column("grid_width")[0].as_py()
        cell = row.column("attention")
        if isinstance(cell, pa.ChunkedArray):
            cell = cell.combine_chunks()
        if height is None or width is None or cell.null_count:
            return np.zeros((0, 0, 0), np.float32)
        values = pc.list_flatten(pc.list_flatten(cell)).to_numpy(zero_copy_only=False)
        return values.astype(np.float32, copy=False).reshape(-1, height, width)
    if i is not None and hasattr(row_or_table, "iloc"):  # a pandas DataFrame
        row_or_table = row_or_table.iloc[i]
    row = row_or_table
    get = row.get if hasattr(row, "get") else (lambda key: getattr(row, key, None))
    attention, height, width = get("attention"), get("grid_height"), get("grid_width")
    if attention is None or _is_missing(height) or _is_missing(width):
        return np.zeros((0, 0, 0), np.float32)
    height, width = int(height), int(width)
    if len(attention) == 0:
        return np.zeros((0, height, width), np.float32)
    return np.stack([np.asarray(grid, dtype=np.float32) for grid in attention]).reshape(-1, height, width)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------


def _encode(metadata: dict[str, Any] | None) -> dict[bytes, bytes]:
    encoded = {b"satcli.schema_version": str(SCHEMA_VERSION).encode()}
    for key, value in (metadata or {}).items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        encoded[key.encode()] = text.encode()
    return encoded


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The satcli key-value metadata of a results file, JSON values parsed. Raises SatcliError if unreadable."""
    schema = read_schema(path)
    result: dict[str, Any] = {}
    for key, value in (schema.metadata or {}).items():
        name = key.decode(errors="replace")
        if not name.startswith("satcli."):
            continue
        text = value.decode(errors="replace")
        try:
            result[name] = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or JSON Python cannot hold: keep the text
            result[name] = text
    return result


def read_schema(path: str | Path) -> pa.Schema:
    """The schema of a results file, checked to hold every satcli column. Raises SatcliError otherwise."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as error:
        raise SatcliError(f"not a readable Parquet file ({first_line(error)})", path) from error
    missing = [name for name in SCHEMA.names if name not in schema.names and name not in _LATER_COLUMNS]
    if missing:
        raise SatcliError(f"not a satcli results file (no column {', '.join(missing)})", path)
    for name in SCHEMA.names:
        if name in schema.names and not _same_kind(schema.field(name).type, SCHEMA.field(name).type):
            raise SatcliError(f"column {name} holds {schema.field(name).type}, not {SCHEMA.field(name).type}: "
                              "not a satcli results file", path)
    return schema


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column's type reads as the satcli one (a file edited with pandas may hold int64 for int32,
    double for float32, large_string for string; an all-null column is null)."""
    types = pa.types
    if types.is_null(actual):
        return True
    if types.is_list(expected):
        listed = types.is_list(actual) or types.is_large_list(actual) or types.is_fixed_size_list(actual)
        return listed and _same_kind(actual.value_type, expected.value_type)
    kinds = [(types.is_string, lambda t: types.is_string(t) or types.is_large_string(t)),
             (types.is_floating, lambda t: types.is_floating(t) or types.is_integer(t)),
             (types.is_integer, types.is_integer), (types.is_boolean, types.is_boolean),
             (types.is_struct, types.is_struct)]
    return next((accepts(actual) for is_kind, accepts in kinds if is_kind(expected)), actual == expected)


# ---------------------------------------------------------------------------------------------------------------
# Writing: always to a temporary file next to the destination, renamed over it when complete
# ---------------------------------------------------------------------------------------------------------------


class ResultsWriter:
    """Streams tables into ``path`` atomically: nothing appears at ``path`` until :meth:`close` succeeds.

    Use as a context manager; an exception inside the block removes the temporary file and leaves any older
    ``path`` untouched. ``close`` flushes the data to disk (fsync) before the rename, and the directory after
    it, so a power loss leaves the old file or the new one, never a torn one.
    """

    def __init__(self, path: str | Path, metadata: dict[str, Any] | None = None,
                 row_group_size: int = ROW_GROUP_SIZE):
        self.path = Path(path)
        self.schema = SCHEMA.with_metadata(_encode(metadata))
        self.row_group_size = row_group_size
        self.n_rows = 0
        self._tmp = temp_path(self.path)  # named so that a later run can remove it if this one is killed
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None  # ours to close: after a failed write pyarrow may keep its own open
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._sink = pa.OSFile(str(self._tmp), "wb")
            self._writer = pq.ParquetWriter(self._sink, self.schema, compression=_COMPRESSION)
        except OSError as error:
            self.abort()
            raise disk_error(error, self.path) from error

    def write(self, table: pa.Table) -> None:
        """Append rows (a table with the satcli columns; other metadata is replaced by this file's)."""
        assert self._writer is not None
        table = conform(table)
        try:
            self._writer.write_table(table.replace_schema_metadata(self.schema.metadata),
                                     row_group_size=self.row_group_size)
        except OSError as error:
            raise disk_error(error, self.path) from error
        self.n_rows += table.num_rows

    def close(self) -> Path:
        """Finish the file and rename it over ``path``. A failure (disk full, read-only) removes the temporary
        file, leaves ``path`` as it was and raises SatcliError naming ``path`` and the cause."""
        assert self._writer is not None
        try:
            self._writer.close()
            assert self._sink is not None
            self._sink.close()
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._tmp, self.path)
        except OSError as error:
            self.abort()
            raise disk_error(error, self.path) from error
        fsync_directory(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (its space is free again only once no handle holds it)."""
        for close in (self._writer, self._sink):
            if close is not None:
                with contextlib.suppress(OSError, pa.ArrowException):
                    close.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_results(path: str | Path, table_or_rows: pa.Table | Sequence[CaptionRow],
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write one table (or rows) to ``path`` atomically."""
    table = table_or_rows if isinstance(table_or_rows, pa.Table) else to_table(table_or_rows)
    with ResultsWriter(path, metadata) as writer:
        writer.write(table)
    return writer.path


def conform(table: pa.Table) -> pa.Table:
    """A table with exactly the satcli columns, in order and type (extra columns dropped)."""
    for name in _LATER_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    try:
        return table.select(SCHEMA.names).cast(SCHEMA.remove_metadata())
    except (KeyError, pa.ArrowException) as error:
        raise ValueError(f"not a satcli results table: {first_line(error)}") from error


def read_column(path: str | Path, column: str) -> list[Any]:
    """One column of a results file as Python values (used to learn which paths a file holds)."""
    try:
        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise SatcliError(f"not a readable results file ({first_line(error)})", path) from error


def count_rows(results: Path) -> int:
    """How many rows a results file holds. Raises SatcliError if it is not one."""
    read_schema(results)
    return pq.ParquetFile(results).metadata.num_rows


def iter_results(results: Path, columns: Sequence[str], batch_size: int = 256) -> Iterator[dict]:
    """The rows of a results file as dicts, a batch at a time (bounded memory). Raises SatcliError if unreadable.

    A column the file predates (see ``_LATER_COLUMNS``) reads as None.
    """
    names = read_schema(results).names
    present = [c for c in columns if c in names]
    absent = dict.fromkeys(c for c in columns if c not in names)
    try:
        file = pq.ParquetFile(results)
        for batch in file.iter_batches(batch_size=batch_size, columns=present):
            for row in batch.to_pylist():
                row.update(absent)
                yield row
    except (OSError, pa.ArrowException) as error:
        raise SatcliError(f"cannot read results ({first_line(error)})", results) from error


def attention_of(row: dict, results: Path) -> np.ndarray:
    """:func:`read_attention` of a row, or a one-line SatcliError naming the file when the row's grids do not fit
    its ``grid_height × grid_width`` (a file satcli did not write)."""
    try:
        return read_attention(row)
    except (ValueError, TypeError) as error:
        raise SatcliError(f"the attention of {row['path']} does not fit its {row['grid_height']} × "
                          f"{row['grid_width']} grid; satcli did not write this file", results) from error


def recorded_image_root(results: str | Path) -> Path | None:
    """The folder a results file's relative paths start from, as recorded when it was written (``satcli caption``'s
    ``--root``, ``satcli evaluate``'s dataset images); None when not recorded or no longer there (then the
    current directory is the best guess)."""
    root = (read_metadata(results).get("satcli.images") or {}).get("root")
    return Path(root) if isinstance(root, str) and os.path.isdir(root) else None
