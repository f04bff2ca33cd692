"""Training a captioner, as a package whose files are its jobs.

- :mod:`~satcli.training.options`: what steers a run (:class:`TrainOptions`), what it returns
  (:class:`TrainResult`), and the checks that keep ``--resume`` honest;
- :mod:`~satcli.training.run`: the one run skeleton (run folder, resume, best/last checkpoints, metrics.jsonl,
  learning-rate plateau, early stopping) that both jobs use;
- :mod:`~satcli.training.supervised`: cross-entropy training; :mod:`~satcli.training.scst`: self-critical training;
- :mod:`~satcli.training.batches`: what an epoch feeds the model; :mod:`~satcli.training.distributed`: torchrun;
- :mod:`~satcli.training.start`: :func:`train`, the one entry.
"""

from satcli.training.options import TrainOptions, TrainResult
from satcli.training.start import train

__all__ = ["TrainOptions", "TrainResult", "train"]
