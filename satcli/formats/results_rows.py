"""Rows of a results file checked before they are drawn (``satcli report``, ``--overlays``): a file edited by hand
or written by another tool gives a one-line error naming the file and the row, or an error row, never a traceback
or a blank page.

Rows count from 0, as pyarrow and pandas number them. What each fault gives (docs/reliability.md):

- a row without a path, a captioned row (``error`` null) without ``tokens`` or with a null word, as many
  attention grids or ``token_logprobs`` as there are words: one-line error (the row cannot be shown as it is);
- attention holding NaN, infinite or negative weights (what a model with NaN weights writes): the row becomes an
  error row, its words shown, nothing drawn;
- a ``token_logprobs`` value that is no log-probability (NaN, above 0): that word's probability is unknown
  (:func:`satcli.core.printing.word_probability`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from satcli.core.errors import SatcliError
from satcli.formats.results import attention_of, iter_results
from satcli.formats.results_pick import iter_rows_at

NOT_FINITE = "attention holds NaN, infinite or negative weights: nothing to draw"
_NEEDED = ("path", "tokens", "attention", "grid_height", "grid_width", "error", "token_logprobs")


def checked_rows(results: Path, columns: Sequence[str], only: Sequence[int] | None = None) -> Iterator[dict]:
    """:func:`~satcli.formats.results.iter_results` with every row checked (with ``only``, just the rows at
    those indices, in file order); ``attention`` comes as the numpy array (n_tokens, grid_height, grid_width) of
    :func:`~satcli.formats.results.read_attention`. Raises SatcliError naming ``results`` and the row for a row
    that cannot be shown; sets ``error`` to :data:`NOT_FINITE` (and ``attention`` to an empty array) where the
    weights are not finite."""
    columns = list(dict.fromkeys([*columns, *_NEEDED]))
    rows = enumerate(iter_results(results, columns)) if only is None else iter_rows_at(results, columns, only)
    for index, row in rows:
        yield _checked(row, index, results)


def _checked(row: dict, index: int, results: Path) -> dict:
    path = row["path"]
    if not isinstance(path, str):
        raise SatcliError(f"row {index} has no path (null); satcli writes one in every row", results)
    where = f"row {index} ({path})"
    if row["error"] is not None:
        row["attention"] = np.zeros((0, 0, 0), np.float32)
        return row
    tokens = row["tokens"]
    if tokens is None:
        raise SatcliError(f"{where} has neither caption words (tokens is null) nor an error", results)
    if any(not isinstance(word, str) for word in tokens):
        raise SatcliError(f"{where} has a null word in tokens", results)
    attention = attention_of(row, results)
    if attention.shape[0] != len(tokens):
        raise SatcliError(f"{where} has {len(tokens)} words but {attention.shape[0]} attention grids", results)
    logprobs = row["token_logprobs"]
    if logprobs is not None and len(logprobs) != len(tokens):
        raise SatcliError(f"{where} has {len(tokens)} words but {len(logprobs)} token_logprobs", results)
    if not np.isfinite(attention).all() or (attention < 0).any():
        row["error"], attention = NOT_FINITE, np.zeros((0, 0, 0), np.float32)
    row["attention"] = attention
    return row
