"""``satcli preprocess``: a dataset in, a preprocessed store out (satcli.data.preprocess does the work)."""

from __future__ import annotations

from satcli.data.preprocess import PreprocessOptions, PreprocessResult, preprocess, summary_table

__all__ = ["PreprocessOptions", "PreprocessResult", "summary_table", "run"]


def run(options: PreprocessOptions) -> PreprocessResult:
    """Run the command; the CLI prints what it returns."""
    return preprocess(options)
