"""``satcli evaluate``: a model scored on a stored split (satcli.scoring.evaluate does the work)."""

from __future__ import annotations

from satcli.scoring.evaluate import BeamResult, EvaluateOptions, EvaluateResult, evaluate, parse_beam_sizes

__all__ = ["BeamResult", "EvaluateOptions", "EvaluateResult", "parse_beam_sizes", "run"]


def run(options: EvaluateOptions) -> EvaluateResult:
    """Run the command; the CLI prints what it returns."""
    return evaluate(options)
