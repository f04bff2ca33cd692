"""The one entry to training: join the ranks, pick the job (cross-entropy or SCST), run it."""

from __future__ import annotations

from satcli.training.distributed import Ranks, end_process_group, start_process_group
from satcli.training.options import TrainOptions, TrainResult
from satcli.training.run import resumes_scst
from satcli.training.scst import train_scst
from satcli.training.supervised import train_supervised


def train(options: TrainOptions) -> TrainResult:
    """Train as ``options`` say; return where the checkpoints are and how well the best one did."""
    ranks = Ranks.from_env()
    start_process_group(ranks, options.device)
    try:
        if options.scst or resumes_scst(options):
            return train_scst(options, ranks)
        return train_supervised(options, ranks)
    finally:
        end_process_group(ranks)
