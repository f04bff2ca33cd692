"""Results as text on stdout: ``satcli caption``'s lines and JSON lines, streamed from the results Parquet."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def word_probability(logprob: float | None) -> float | None:
    """A word's probability from its log-probability (``token_logprobs``), or None when unknown or impossible:
    NaN, or above 0 (a hand-edited 1000 would overflow ``exp``). Minus infinity is probability 0."""
    if logprob is None or math.isnan(logprob) or logprob > 1e-6:
        return None
    return math.exp(min(logprob, 0.0))


COLUMNS = ("path", "caption", "tokens", "token_logprobs", "sum_logprob", "finished", "error", "alternatives")


def result_records(path: str | Path, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """One dict per row of a results file, without the attention grids: ``path``, ``caption``, ``words``,
    ``word_probs`` (each word's probability, ``exp`` of ``token_logprobs``; null in files written before that
    column), ``sum_logprob``, ``finished``, ``error`` and ``alternatives`` (with ``--n-best`` N > 1: the runners-up,
    best first, each ``{caption, sum_logprob, finished}``; else null). Read in batches: memory stays flat."""
    file = pq.ParquetFile(path)
    columns = [c for c in COLUMNS if c in file.schema_arrow.names]
    for batch in file.iter_batches(batch_size=batch_size, columns=columns):
        for row in batch.to_pylist():
            logprobs = row.get("token_logprobs")
            yield {
                "path": row["path"],
                "caption": row["caption"],
                "words": row["tokens"],
                "word_probs": None if logprobs is None else [word_probability(v) for v in logprobs],
                "sum_logprob": row["sum_logprob"],
                "finished": row["finished"],
                "error": row["error"],
                "alternatives": row.get("alternatives"),
            }
