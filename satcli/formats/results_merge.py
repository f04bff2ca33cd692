"""Merging sorted results files into one, with bounded memory: how caption finishes a run and merge joins parts."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from satcli.core.atomic import remove_stale_temps
from satcli.core.errors import SatcliError
from satcli.formats.results import ROW_GROUP_SIZE, ResultsWriter, conform, read_column, read_schema


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
