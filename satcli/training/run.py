"""The one run skeleton that cross-entropy training and SCST share.

A job (:class:`Job`: :mod:`satcli.training.supervised` or :mod:`satcli.training.scst`) supplies only its own
epoch and its own validation score. Everything else is written once, here: the run folder (refusing to clobber a
run, ``--resume``, ``--overwrite``: the earlier run's files are replaced only when the new run saves its first
epoch, so a run that fails before that, on a mistyped dataset, device or option, leaves them as they were),
restoring the optimiser, scheduler and RNG state, the learning-rate plateau, early stopping after ``patience``
epochs without improvement, ``best.pt`` (when the job's validation score improves) and ``last.pt`` (with
everything ``--resume`` needs), and ``metrics.jsonl`` (one line per epoch, written atomically).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from models.captioner import Captioner
from satcli.core.atomic import write_text
from satcli.core.defaults import remember_model
from satcli.core.errors import SatcliError
from satcli.data.store import StoredDataset
from satcli.data.vocab import Vocabulary
from satcli.formats.checkpoint import read_checkpoint, save_checkpoint
from satcli.formats.model_info import write_model_card
from satcli.training.distributed import Ranks, barrier, broadcast, gather
from satcli.training.options import TrainOptions, TrainResult, resume_options, resumed_options

log = logging.getLogger(__name__)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


@dataclass
class Standing:
    """Where the run stands after an epoch: what ``last.pt`` stores and ``--resume`` restores."""

    start_epoch: int = 0
    best: float = -1.0  # the best validation score of the job's metric
    best_bleu4: float = -1.0  # validation BLEU-4 of that epoch
    since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, scores: dict[str, float], metric: str) -> bool:
        """Take an epoch's validation scores; whether ``metric`` improved on the best so far."""
        improved = scores[metric] > self.best
        if improved:
            self.best, self.best_bleu4, self.since_best = scores[metric], scores["bleu4"], 0
        else:
            self.since_best += 1
        return improved

    def state(self, metric: str) -> dict[str, Any]:
        return {f"best_{metric}": self.best, "best_bleu4": self.best_bleu4,
                "epochs_since_improvement": self.since_best, "history": self.history}


@dataclass
class Run:
    """What every job trains and where it writes."""

    out: Path
    options: TrainOptions
    ranks: Ranks
    device: torch.device
    model: Captioner
    vocab: Vocabulary
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    val_split: str
    standing: Standing = field(default_factory=Standing)


@dataclass
class Trained:
    """An epoch's own numbers: those put before the validation scores in its metrics line, and those after."""

    before: dict[str, Any]
    after: dict[str, Any]


class Job(Protocol):
    """One kind of training: its epoch, its validation score, and what it adds to a run's records."""

    metric: str  # the validation score that picks best.pt, drives the plateau and early stopping

    def epoch(self, epoch: int) -> Trained: ...

    def score(self) -> dict[str, float]: ...  # called on the main rank only

    def learning_rates(self) -> dict[str, float]: ...

    def extra_state(self, rng_ranks: list[dict[str, Any]]) -> dict[str, Any]: ...  # more for last.pt

    def report(self, epoch: int, line: dict[str, Any], improved: bool) -> None: ...  # main rank, after saving

    def close(self) -> None: ...


def validation_split(dataset: StoredDataset) -> str:
    """The split validation scores: ``val``, else ``test``. Refused before any work (feature caching) when the
    dataset has neither with images."""
    for split in ("val", "test"):
        if split in dataset.splits and dataset.n_images(split):
            return split
    raise SatcliError(f"dataset {dataset.name!r} has no 'val' or 'test' split to validate on (it has: "
                      f"{', '.join(dataset.splits) or 'no splits'}); preprocess it with one, e.g. a split field in the "
                      "caption file or the Flickr8k split files", dataset.root)


def run_folder(options: TrainOptions, default: str) -> Path:
    return Path(options.out or Path("runs") / default)


def prepare_out(options: TrainOptions, out: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from, if any; refuses to clobber an earlier run by accident."""
    last = out / LAST
    if options.resume:
        if not last.is_file():
            raise SatcliError(f"nothing to resume: no {LAST} here (start without --resume)", out)
        return read_checkpoint(last)
    if last.is_file() and not options.overwrite:
        raise SatcliError("already holds a training run; pass --resume to continue it, --overwrite to start "
                          "again, or --out for a new run", out)
    return None  # with --overwrite the earlier run's files stay until the first epoch is saved (save_epoch)


def open_run(options: TrainOptions, out: Path, ranks: Ranks) -> tuple[TrainOptions, dict[str, Any] | None]:
    """The run's options (the stored ones on ``--resume``) and the checkpoint it resumes from, if any."""
    resume_from = prepare_out(options, out) if ranks.main else None
    barrier(ranks)
    if ranks.world > 1 and not ranks.main and options.resume:
        resume_from = read_checkpoint(out / LAST)
    if resume_from is not None:
        stored = resume_options(resume_from, out / LAST)
        options = resumed_options(stored, options, out, warn=ranks.main)
    return options, resume_from


def resumes_scst(options: TrainOptions) -> bool:
    """``--resume`` of a run folder that holds an SCST run continues it as SCST, flag or not."""
    last = run_folder(options, options.dataset) / LAST
    if not options.resume or not last.is_file():
        return False
    state = read_checkpoint(last).get("train_state")
    stored = state.get("options") if isinstance(state, dict) else None
    return isinstance(stored, dict) and stored.get("scst") is True


def plateau_scheduler(optimizer: torch.optim.Optimizer,
                      options: TrainOptions) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Multiply the learning rates by ``lr_decay`` once ``lr_patience`` epochs in a row bring no validation
    improvement. (ReduceLROnPlateau's ``patience`` is the number of bad epochs it *tolerates*: it decays on the
    next one, hence ``lr_patience - 1``.)"""
    if options.lr_patience < 1:
        raise SatcliError(f"--lr-patience must be at least 1 (epochs without improvement), got {options.lr_patience}")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=options.lr_decay,
                                                      patience=options.lr_patience - 1)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def own_rng_state(train_state: dict[str, Any], ranks: Ranks) -> dict[str, Any]:
    """This rank's saved RNG state; a run resumed on another number of ranks gives the others fresh seeds."""
    per_rank = train_state.get("rng_ranks") or [train_state["rng"]]
    if len(per_rank) == ranks.world:
        return per_rank[ranks.rank]
    if ranks.main:
        return per_rank[0]
    return {"torch": torch.Generator().manual_seed(1_000_003 * ranks.rank + train_state["epoch"]).get_state()}


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON line per epoch, replaced atomically."""
    write_text(out / METRICS, "".join(json.dumps(line) + "\n" for line in history))


def restore(run: Run, resume_from: dict[str, Any], metric: str) -> None:
    """Continue where ``last.pt`` stopped: optimiser, scheduler, RNG state and the run's standing."""
    state = resume_from["train_state"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(own_rng_state(state, run.ranks), run.device)
    run.standing = Standing(state["epoch"] + 1, state[f"best_{metric}"], state["best_bleu4"],
                            state["epochs_since_improvement"], list(state["history"]))
    if run.ranks.main:
        note = finished_note(run.standing, run.options)
        if note:
            log.warning("%s: %s", run.out, note)
        else:
            log.info("resuming %s at epoch %d", run.out, run.standing.start_epoch + 1)
        write_metrics(run.out, run.standing.history)


def finished_note(standing: Standing, options: TrainOptions) -> str | None:
    """Why ``--resume`` of this run has nothing to train, and how to train longer; None when it has."""
    if standing.start_epoch >= options.epochs:
        return (f"the run is finished ({standing.start_epoch} of {options.epochs} epochs trained); to train "
                f"longer, resume with more epochs, e.g. --resume --epochs {standing.start_epoch + 10}")
    if standing.since_best >= options.patience:
        return (f"the run is finished: it stopped early after {standing.since_best} epochs without validation "
                f"improvement (--patience {options.patience}); to train on, resume with a larger --patience")
    return None


def run_epochs(run: Run, job: Job) -> TrainResult:
    """Train ``job`` epoch by epoch until ``options.epochs`` or early stopping; return the run's result."""
    standing, options, ranks = run.standing, run.options, run.ranks
    epoch = standing.start_epoch - 1
    try:
        for epoch in range(standing.start_epoch, options.epochs):
            if standing.since_best >= options.patience:
                log.info("stopping early: no validation improvement for %d epochs", standing.since_best)
                break
            trained = job.epoch(epoch)
            check_finite_loss(trained, epoch, run.out)
            scores = broadcast(job.score() if ranks.main else None, ranks)
            improved = standing.record(scores, job.metric)
            run.scheduler.step(scores[job.metric])
            line = {"epoch": epoch + 1, **trained.before, **{f"val_{k}": v for k, v in scores.items()},
                    "lr": job.learning_rates(), **trained.after}
            standing.history.append(line)
            save_epoch(run, job, epoch, scores, improved)
            if ranks.main:
                job.report(epoch, line, improved)
            barrier(ranks)
    except KeyboardInterrupt:
        if ranks.main:  # the epoch's bar is gone by now: the warning gets a line of its own
            log.warning("Interrupted: %s", f"{run.out / LAST} holds epoch {len(standing.history)}; add --resume to "
                        "the same command to continue" if standing.history else "no epoch finished, nothing to resume")
        raise
    finally:
        job.close()
    best, last = run.out / BEST, run.out / LAST
    if ranks.main:
        remember_model(best if best.is_file() else last)  # the default model of `satcli caption` from now on
        write_model_card(run.out, best if best.is_file() else last)
    return TrainResult(run.out, best, last, epoch + 1, standing.best_bleu4, standing.history,
                       standing.best if job.metric == "cider_d" else None)


def check_finite_loss(trained: Trained, epoch: int, out: Path) -> None:
    """Stop a run whose loss became NaN or infinite, before its weights (NaN by then) are saved over good ones."""
    loss = trained.before.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        raise SatcliError(f"training diverged: the loss of epoch {epoch + 1} is {loss}; nothing of this epoch was "
                          "saved. Lower the learning rate (--decoder-lr, --encoder-lr, --scst-lr) or --grad-clip "
                          "and start again", out)


def save_epoch(run: Run, job: Job, epoch: int, scores: dict[str, float], improved: bool) -> None:
    """``best.pt`` when the epoch improved, ``last.pt`` with the training state, ``metrics.jsonl``."""
    rng_ranks = gather(rng_state(run.device), run.ranks)  # every rank's own stream, for --resume
    if not run.ranks.main:
        return
    options = run.options.to_dict()
    metrics = {"epoch": epoch + 1, "val_split": run.val_split, **{f"val_{k}": v for k, v in scores.items()}}
    if improved:
        save_checkpoint(run.out / BEST, run.model, run.vocab, options, metrics)
    elif epoch == 0:  # a fresh run's first save: a best.pt still there is an earlier run's (--overwrite)
        (run.out / BEST).unlink(missing_ok=True)
    state = {"options": options, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "rng": rng_ranks[0], **job.extra_state(rng_ranks), "epoch": epoch, **run.standing.state(job.metric)}
    save_checkpoint(run.out / LAST, run.model, run.vocab, options, metrics, train_state=state)
    write_metrics(run.out, run.standing.history)
