"""A few rows of a very large results file, chosen without reading the rest (``satcli report --limit``): the choice
reads one small column, then only the row groups that hold the chosen rows are read."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from satcli.core.errors import SatcliError, first_line
from satcli.formats.results import read_schema


def pick_rows(results: Path, limit: int, by: str = "cider_d") -> tuple[list[int], bool]:
    """The indices (in file order) of the ``limit`` rows lowest in column ``by`` (ties and rows without a value
    after them, in file order), and True; or, when the file has no value in ``by``, the first ``limit`` rows and
    False."""
    n_rows = pq.ParquetFile(results).metadata.num_rows
    if by not in read_schema(results).names:
        return list(range(min(limit, n_rows))), False
    try:
        column = pq.read_table(results, columns=[by]).column(by)
    except (OSError, pa.ArrowException) as error:
        raise SatcliError(f"cannot read results ({first_line(error)})", results) from error
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls read as NaN
    unknown = np.isnan(values)
    if unknown.all():
        return list(range(min(limit, n_rows))), False
    order = np.lexsort((np.arange(len(values)), np.where(unknown, 0.0, values), unknown))
    return sorted(int(i) for i in order[:limit]), True


def iter_rows_at(results: Path, columns: Sequence[str], indices: Sequence[int],
                 batch_size: int = 256) -> Iterator[tuple[int, dict]]:
    """``(index, row)`` for the rows at ``indices``, in file order, reading only the row groups that hold them
    (bounded memory). A column the file predates reads as None, as in
    :func:`~satcli.formats.results.iter_results`."""
    names = read_schema(results).names
    present = [c for c in columns if c in names]
    absent = dict.fromkeys(c for c in columns if c not in names)
    wanted = sorted(set(indices))
    try:
        file = pq.ParquetFile(results)
        starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, i, side="right")) - 1 for i in wanted})
        for group in groups:
            start = int(starts[group])
            for batch in file.iter_batches(batch_size=batch_size, row_groups=[group], columns=present):
                inside = wanted[bisect_left(wanted, start):bisect_left(wanted, start + batch.num_rows)]
                if inside:
                    for i, row in zip(inside, batch.take([i - start for i in inside]).to_pylist(), strict=True):
                        row.update(absent)
                        yield i, row
                start += batch.num_rows
    except (OSError, pa.ArrowException) as error:
        raise SatcliError(f"cannot read results ({first_line(error)})", results) from error
