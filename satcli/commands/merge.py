"""``satcli merge``: join the parts written by sharded caption runs into one results file.

``satcli caption --shard K/N`` (or rank K of a ``torchrun`` launch) writes ``captions.part-K-of-N.parquet``.
The parts are already one dataset (``pyarrow.dataset`` or duckdb read them with a glob); merging gives the
single file an unsharded run would have written: every image once, sorted by path, the same metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from satcli.captioning.options import DEFAULT_OUTPUT, CaptionSummary
from satcli.captioning.shards import merge_parts


@dataclass(frozen=True)
class MergeOptions:
    """What ``satcli merge`` was asked to do."""

    parts: tuple[Path, ...] = ()  # empty: every ``<output stem>.part-K-of-N`` file next to the output
    output: Path = DEFAULT_OUTPUT
    remove_parts: bool = False


def run(options: MergeOptions) -> CaptionSummary:
    """Check the parts are complete and from the same model and options, then merge them into the output; the
    summary counts the merged file's rows (cli.py prints it)."""
    counts = merge_parts(list(options.parts), options.output, options.remove_parts)
    errors = {kind: n for kind, n in counts.items() if kind != "rows"}
    return CaptionSummary(options.output, counts["rows"], n_captioned=counts["rows"] - sum(errors.values()),
                          errors=errors)
