"""Caption results as Parquet: the schema, defined once, and the only code that writes or merges such files.

One row per input image (docs/formats.md shows how to read it with pandas, pyarrow and duckdb):

===============  ===========================  =====================================================================
column           type                         meaning
===============  ===========================  =====================================================================
path             string                       the image, as named on the command line (relative when possible)
caption          string                       the caption (null when ``error`` is set)
tokens           list<string>                 its words, one per attention grid
sum_logprob      float                        log-probability of the caption (words and ``<end>``)
finished         bool                         false when the caption was cut at ``max_length`` without ``<end>``
attention        list<list<float>>            one row-major ``grid_height × grid_width`` grid per token, sums to 1
grid_height      int32                        rows of the encoder's feature grid
grid_width       int32                        columns of the encoder's feature grid
image_width      int32                        the original image's width after EXIF orientation
image_height     int32                        the original image's height after EXIF orientation
error            string                       null, or ``kind: reason`` when the image could not be captioned
alternatives     list<struct<caption,         with ``--n-best N`` > 1: the 2nd … Nth best captions, best first, with
                 sum_logprob, finished>>      their log-probabilities (no attention); null otherwise
token_logprobs   list<float>                  log-probability of each word given the words before it, one per
                                              token; ``sum_logprob`` minus their sum is ``<end>``'s. Null in files
                                              written before this column
===============  ===========================  =====================================================================

The file's key-value metadata holds ``satcli.version``, ``satcli.schema_version``, ``satcli.model`` and
``satcli.decoding`` (JSON) and more; :func:`read_metadata` returns it parsed.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from satcli.atomic import disk_error, fsync_directory, remove_stale_temps, temp_path
from satcli.errors import SatcliError, first_line

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
])
# Columns added after the first release: files written before them still read, with the column all null.
_LATER_COLUMNS = ("alternatives", "token_logprobs")

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
    return schema


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


# ---------------------------------------------------------------------------------------------------------------
# Merging sorted files with bounded memory
# ---------------------------------------------------------------------------------------------------------------


def read_column(path: str | Path, column: str) -> list[Any]:
    """One column of a results file as Python values (used to learn which paths a file holds)."""
    try:
        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise SatcliError(f"not a readable results file ({first_line(error)})", path) from error


class _Cursor:
    """Reads rows of one source in increasing order, one row group at a time."""

    def __init__(self, path: Path):
        self.file = pq.ParquetFile(path)
        self.starts = np.cumsum([0] + [self.file.metadata.row_group(g).num_rows
                                       for g in range(self.file.num_row_groups)])
        self.group = -1
        self.table: pa.Table | None = None

    def take(self, start: int, length: int) -> Iterator[pa.Table]:
        """Rows ``start`` … ``start + length - 1`` as slices of the row groups holding them."""
        while length > 0:
            group = int(np.searchsorted(self.starts, start, side="right")) - 1
            if group != self.group:
                self.table, self.group = conform(self.file.read_row_group(group)), group
            assert self.table is not None
            offset = start - int(self.starts[group])
            n = min(length, self.table.num_rows - offset)
            yield self.table.slice(offset, n)
            start, length = start + n, length - n

    def release(self) -> None:
        self.table, self.group = None, -1


def merge_results(sources: Sequence[str | Path], destination: str | Path, metadata: dict[str, Any] | None = None,
                  keep: Iterable[str] | None = None, on_duplicate: str = "first") -> dict[str, int]:
    """Merge results files into one sorted by path, atomically, holding one row group per source in memory.

    Each source must be sorted by path (every file satcli writes is). A path found in several sources is
    written once, from the earliest source (``on_duplicate="first"``) or refused (``"error"``: a SatcliError
    naming both files). ``keep``: write only these paths. Returns counts: ``rows`` and rows per error kind.
    """
    sources = [Path(s) for s in sources]
    wanted = None if keep is None else set(keep)
    streams = []
    for index, source in enumerate(sources):
        read_schema(source)
        paths = read_column(source, "path")
        if any(a > b for a, b in zip(paths, paths[1:], strict=False)):
            raise SatcliError("results file is not sorted by path; satcli did not write it", source)
        streams.append([(p, index, row) for row, p in enumerate(paths) if wanted is None or p in wanted])
    remaining = [len(s) for s in streams]
    cursors: dict[int, _Cursor] = {}
    counts: dict[str, int] = {"rows": 0}
    pending: list[pa.Table] = []
    n_pending = 0
    last_path: str | None = None
    last_source = -1
    run: list[int] = []  # [source, first row, length] of the run of consecutive rows being gathered

    remove_stale_temps(destination)  # a merge into it that was killed left its temporary file
    with ResultsWriter(destination, metadata) as writer:
        def flush_run() -> None:
            nonlocal n_pending
            if not run:
                return
            source, start, length = run
            cursor = cursors.setdefault(source, _Cursor(sources[source]))
            for piece in cursor.take(start, length):
                pending.append(piece)
                n_pending += piece.num_rows
            remaining[source] -= length
            if remaining[source] == 0:
                cursors.pop(source).release()
            run.clear()

        def flush_pending() -> None:
            nonlocal n_pending
            if pending:
                table = pa.concat_tables(pending)
                for error in table.column("error").to_pylist():
                    if error is not None:
                        kind = error.split(":", 1)[0]
                        counts[kind] = counts.get(kind, 0) + 1
                writer.write(table)
                pending.clear()
                n_pending = 0

        for path, source, row in heapq.merge(*streams):
            if path == last_path:
                if on_duplicate == "error" and source != last_source:
                    raise SatcliError(f"{path} is also in {sources[last_source]}; parts must not overlap",
                                      sources[source])
                flush_run()
                remaining[source] -= 1  # a duplicate is skipped, but its source still moves on
                if remaining[source] == 0 and source in cursors:
                    cursors.pop(source).release()
                continue
            last_path, last_source = path, source
            counts["rows"] += 1
            if run and run[0] == source and run[1] + run[2] == row:
                run[2] += 1
            else:
                flush_run()
                run.extend([source, row, 1])
            if n_pending + (run[2] if run else 0) >= ROW_GROUP_SIZE:
                flush_run()
                flush_pending()
        flush_run()
        flush_pending()
    return counts
