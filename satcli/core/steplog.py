"""The per-step training log: ``steps.jsonl`` beside ``metrics.jsonl``, and TensorBoard event files on request.

One JSON line per optimiser step: ``{"epoch": 1, "step": 37, "loss": 2.91, "lr": {"decoder": 0.0004}}``
(``epoch`` counts from 1, ``step`` over the whole run; under torchrun the loss is rank 0's share of the
global batch times the number of ranks, an estimate that saves a collective per step). Losses stay on the
device and are read every :data:`FLUSH_EVERY` steps in one transfer, so the GPU does not wait every step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from satcli.core.atomic import move_into_place, remove_stale_temps, temp_path, write_text
from satcli.core.errors import SatcliError

log = logging.getLogger(__name__)

STEPS = "steps.jsonl"
TENSORBOARD = "tensorboard"
FLUSH_EVERY = 20


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SatcliError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class StepLog:
    """Appends to ``out/steps.jsonl`` (and TensorBoard when ``tensorboard``); on resume, drops the lines of
    epochs after ``keep_epochs`` (written by a run killed mid-epoch, which the resumed run trains again).

    A fresh run (``keep_epochs`` 0) writes its first epoch to a temporary file beside ``steps.jsonl`` and puts it
    in place at the end of that epoch, so an earlier run's log (``--overwrite``) is kept until the new run has
    saved an epoch, like its checkpoints."""

    def __init__(self, out: Path, keep_epochs: int = 0, tensorboard: bool = False):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / STEPS
        self._writing = self.path
        if keep_epochs:
            self._trim(keep_epochs)
        else:
            remove_stale_temps(self.path)  # left by a fresh run killed in its first epoch
            self._writing = temp_path(self.path)
        self._file = open(self._writing, "a", encoding="utf-8")  # noqa: SIM115 — open for the whole run
        self._pending: list[tuple[int, int, torch.Tensor, dict[str, float]]] = []
        self.writer = require_tensorboard()(str(out / TENSORBOARD)) if tensorboard else None

    def _trim(self, keep_epochs: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["epoch"] <= keep_epochs:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        write_text(self.path, "".join(kept))  # a kill while trimming leaves the old log, not half of it

    def step(self, epoch: int, step: int, loss: torch.Tensor, lrs: dict[str, float]) -> None:
        """Record one step (``loss`` a 0-d tensor, maybe on the GPU)."""
        self._pending.append((epoch, step, loss.detach(), dict(lrs)))
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        losses = torch.stack([loss.float() for _, _, loss, _ in self._pending])
        for (epoch, step, _, lrs), loss in zip(self._pending, losses.cpu().tolist(), strict=True):
            self._file.write(json.dumps({"epoch": epoch, "step": step, "loss": loss, "lr": lrs}) + "\n")
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, step)
                for name, value in lrs.items():
                    self.writer.add_scalar(f"lr/{name}", value, step)
        self._file.flush()
        self._pending.clear()

    def epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """Validation scores at the end of an epoch (TensorBoard only; metrics.jsonl has them already)."""
        self.flush()
        if self._writing != self.path:  # the first epoch of a fresh run is saved: its log replaces any earlier
            self._file.close()
            move_into_place(self._writing, self.path)
            self._writing = self.path
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — open for the whole run
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"val/{name}", value, step)
            self.writer.add_scalar("epoch", epoch, step)
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._writing != self.path:  # no epoch saved: the log of an unsaved epoch is not kept
            self._writing.unlink(missing_ok=True)
        if self.writer is not None:
            self.writer.close()
