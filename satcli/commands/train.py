"""``satcli train``: train a captioner on a preprocessed dataset (cross-entropy, or SCST with ``--scst``).

Writes ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``steps.jsonl`` to the run folder; the work is
:mod:`satcli.training`'s. ``run`` returns a :class:`TrainResult`, which :mod:`satcli.cli` prints.
"""

from __future__ import annotations

from satcli.training.options import TrainOptions, TrainResult
from satcli.training.plan import TrainPlan, plan_training
from satcli.training.start import train

__all__ = ["TrainOptions", "TrainPlan", "TrainResult", "plan", "run"]


def run(options: TrainOptions) -> TrainResult:
    """Train as ``options`` say; return where the checkpoints are and how well the best one did."""
    return train(options)


def plan(options: TrainOptions) -> TrainPlan:
    """``--dry-run``: the checks the run makes first, and what it would do; nothing is trained or written."""
    return plan_training(options)
