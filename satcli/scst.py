"""``satcli train --scst --init CKPT``: self-critical sequence training (Rennie et al., 2017).

A trained captioner (``--init``) is fine-tuned to maximise the CIDEr-D of its own captions instead of the
likelihood of the references. For every training image, ``scst_samples`` captions are drawn from the model
and one is decoded greedily; each sample's reward is its CIDEr-D against the image's reference captions
(document frequencies from the whole training split), and the greedy caption's CIDEr-D is the baseline:

    loss = - mean over samples of (CIDEr-D(sample) - CIDEr-D(greedy)) · log p(sample)

so a sample better than what the model would say anyway is made more likely, a worse one less. Checkpoints
are the ordinary format (``best.pt`` by validation CIDEr-D, ``last.pt`` with the optimiser and RNG state for
``--resume``), so evaluate and caption use them unchanged. The encoder stays frozen (cached features). As in
Rennie et al., the reward is the whole objective: the attention regulariser (``--doubly-stochastic``) belongs
to cross-entropy training and is not added here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.progress import TextColumn
from rich.table import Table

from models.captioner import Captioner, CaptionerConfig
from models.decoding import decode, sample
from satcli.checkpoint import read_checkpoint, save_checkpoint
from satcli.console import console, make_progress
from satcli.device import resolve_device
from satcli.errors import SatcliError, first_line
from satcli.features import cached_features
from satcli.metrics import CiderD, bleu
from satcli.store import StoredDataset
from satcli.text import tokenize
from satcli.vocab import Vocabulary

if TYPE_CHECKING:
    from satcli.train import Ranks, TrainOptions, TrainResult

log = logging.getLogger(__name__)


@dataclass
class Rewards:
    """CIDEr-D rewards of one batch."""

    samples: np.ndarray  # (B, n_samples)
    greedy: np.ndarray  # (B,)

    @property
    def advantages(self) -> np.ndarray:
        """(B, n_samples): each sample's reward minus the greedy caption's reward of the same image."""
        return self.samples - self.greedy[:, None]


def scst_rewards(scorer: CiderD, sampled: Sequence[Sequence[Sequence[str]]], greedy: Sequence[Sequence[str]],
                 references: Sequence[Sequence[Sequence[str]]]) -> Rewards:
    """``sampled[b][k]``: the words of sample k of image b; ``greedy[b]`` its greedy caption; ``references[b]``
    its tokenised references. Scores every caption with ``scorer`` (CIDEr-D, COCO scale)."""
    n_samples = len(sampled[0]) if sampled else 0
    if any(len(s) != n_samples for s in sampled):
        raise ValueError("every image needs the same number of samples")
    flat = [words for per_image in sampled for words in per_image]
    repeated = [refs for refs in references for _ in range(n_samples)]
    sample_scores = scorer.scores(flat, repeated).reshape(len(sampled), n_samples)
    return Rewards(sample_scores, scorer.scores(list(greedy), references))


def policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-mean_k (A_k · log p(sample_k)). logprobs (B, n, T) per token, 0 after <end>; advantages (B, n)."""
    return -(advantages.to(logprobs.dtype) * logprobs.sum(dim=2)).mean()


def scst_optimizer(model: Captioner, options: TrainOptions) -> torch.optim.Optimizer:
    """Adam on the decoder at ``options.scst_lr`` (not the cross-entropy ``decoder_lr``, 8× larger by default)."""
    return torch.optim.Adam(model.decoder.parameters(), lr=options.scst_lr)


def _image_plan(n_images: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n_images, generator=generator).split(batch_size))


def _features(array: np.ndarray, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    order = np.sort(rows.numpy())  # sorted reads from the memory map; the batch order does not matter
    return torch.from_numpy(np.asarray(array[order], dtype=np.float32)).to(device), torch.from_numpy(order)


def evaluate_split(model: Captioner, vocab: Vocabulary, features: np.ndarray,
                   references: list[list[list[str]]], device: torch.device, beam_size: int, max_length: int,
                   batch_size: int = 100) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D (document frequencies from these references) of decoded captions."""
    hypotheses: list[list[str]] = []
    for start in range(0, len(features), batch_size):
        chunk = torch.from_numpy(np.asarray(features[start : start + batch_size], np.float32)).to(device)
        hypotheses.extend(vocab.decode(r.tokens) for r in decode(model, chunk, beam_size=beam_size,
                                                                  max_length=max_length))
    scores = bleu(references, hypotheses)
    scores["cider_d"] = float(CiderD(references).scores(hypotheses, references).mean())
    return scores


def run_scst(options: TrainOptions, ranks: Ranks) -> TrainResult:
    """Self-critical fine-tuning as ``options`` say (``options.scst``; ``options.init`` or ``--resume``)."""
    from satcli.train import (
        BEST,
        LAST,
        TrainResult,
        _prepare_out,
        _remember,
        _rng_state,
        _set_rng_state,
        _write_metrics,
        plateau_scheduler,
        resume_options,
        resumed_options,
    )

    if ranks.world > 1:
        raise SatcliError("--scst trains on one process; run it without torchrun")
    out = Path(options.out or Path("runs") / f"{options.dataset}-scst")
    resume_from = _prepare_out(options, out)
    if resume_from is not None:
        stored = resume_options(resume_from, out / LAST)
        options = resumed_options(stored, options, out)
        start = resume_from
    else:
        if options.init is None:
            raise SatcliError("--scst fine-tunes a trained model: name it with --init CKPT")
        start = read_checkpoint(options.init)
    if options.scst_samples < 1:
        raise SatcliError(f"--scst-samples must be at least 1, got {options.scst_samples}")
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)

    dataset = StoredDataset.open(options.data_root, options.dataset)
    vocab = dataset.vocab
    source = out / LAST if resume_from is not None else Path(options.init)  # type: ignore[arg-type]
    if list(start["vocab"]) != vocab.to_list():
        raise SatcliError(f"the model's vocabulary is not the one of dataset {options.dataset!r}; SCST must use "
                          "the dataset the model was trained on", source)
    try:
        model = Captioner(CaptionerConfig.from_dict(start["config"]))
        model.load_state_dict(start["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise SatcliError(f"checkpoint does not describe a valid model: {first_line(error)}",
                          source) from error
    model.to(device)
    model.encoder.set_fine_tuning(0)
    val_split = "val" if "val" in dataset.splits else "test"

    optimizer = scst_optimizer(model, options)
    scheduler = plateau_scheduler(optimizer, options)
    start_epoch, best_cider, since_best, history = 0, -1.0, 0, []
    best_bleu = -1.0
    if resume_from is not None:
        state = resume_from["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
        start_epoch, best_cider, best_bleu = state["epoch"] + 1, state["best_cider_d"], state["best_bleu4"]
        since_best, history = state["epochs_since_improvement"], list(state["history"])
        log.info("resuming %s at epoch %d", out, start_epoch + 1)
        _write_metrics(out, history)

    train_features = cached_features(dataset, "train", model, device)
    val_features = cached_features(dataset, val_split, model, device)
    train_refs = [[tokenize(c) for c in captions] for captions in dataset.captions("train")]
    val_refs = [[tokenize(c) for c in captions] for captions in dataset.captions(val_split)]
    scorer = CiderD(train_refs)
    if start_epoch == 0 and resume_from is None:
        before = evaluate_split(model, vocab, val_features, val_refs, device, options.val_beam_size,
                                options.val_max_length)
        console.print(f"before SCST: val CIDEr-D {100 * before['cider_d']:.1f}  BLEU-4 {100 * before['bleu4']:.1f}")

    last_path, best_path = out / LAST, out / BEST
    epoch = start_epoch - 1
    for epoch in range(start_epoch, options.epochs):
        if since_best >= options.patience:
            log.info("stopping early: no validation improvement for %d epochs", since_best)
            break
        line = _scst_epoch(model, optimizer, train_features, train_refs, vocab, scorer, options, epoch, device)
        scores = evaluate_split(model, vocab, val_features, val_refs, device, options.val_beam_size,
                                options.val_max_length)
        improved = scores["cider_d"] > best_cider
        if improved:
            best_cider, best_bleu, since_best = scores["cider_d"], scores["bleu4"], 0
        else:
            since_best += 1
        scheduler.step(scores["cider_d"])
        line = {"epoch": epoch + 1, **line, **{f"val_{k}": v for k, v in scores.items()},
                "lr": {"decoder": optimizer.param_groups[0]["lr"]}, "scst": True}
        history.append(line)
        metrics = {"epoch": epoch + 1, "val_split": val_split, **{f"val_{k}": v for k, v in scores.items()}}
        if improved:
            save_checkpoint(best_path, model, vocab, options.to_dict(), metrics)
        state = {"options": options.to_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_state(device), "epoch": epoch,
                 "best_cider_d": best_cider, "best_bleu4": best_bleu, "epochs_since_improvement": since_best,
                 "history": history}
        save_checkpoint(last_path, model, vocab, options.to_dict(), metrics, train_state=state)
        _write_metrics(out, history)
        console.print(f"epoch {epoch + 1}: reward {line['sample_reward']:.3f} (greedy {line['greedy_reward']:.3f})"
                      f"  val CIDEr-D {100 * scores['cider_d']:.1f}  BLEU-4 {100 * scores['bleu4']:.1f}"
                      f"{'  (best)' if improved else ''}")

    _summary(out, history, best_cider)
    _remember(best_path if best_path.is_file() else last_path)
    return TrainResult(out, best_path, last_path, epoch + 1, best_bleu, history)


def _scst_epoch(model: Captioner, optimizer: torch.optim.Optimizer, features: np.ndarray,
                references: list[list[list[str]]], vocab: Vocabulary, scorer: CiderD, options: TrainOptions,
                epoch: int, device: torch.device) -> dict[str, Any]:
    """One pass over the training images; returns the epoch's mean rewards and rates."""
    plan = _image_plan(len(features), options.batch_size, options.seed, epoch)
    progress = make_progress(TextColumn("reward {task.fields[reward]:.3f}"))
    task = progress.add_task(f"SCST epoch {epoch + 1}/{options.epochs}", total=len(plan), unit="steps",
                             reward=float("nan"))
    sample_sum = greedy_sum = loss_sum = 0.0
    n_images = 0
    started = time.perf_counter()
    model.train()
    with progress:
        for rows in plan:
            batch, order = _features(features, rows, device)
            greedy = [vocab.decode(r.tokens) for r in decode(model, batch, beam_size=1,
                                                              max_length=options.val_max_length)]
            drawn = sample(model, batch, options.scst_samples, options.val_max_length)
            tokens = drawn.tokens.cpu().tolist()
            sampled = [[vocab.decode(ids) for ids in per_image] for per_image in tokens]
            rewards = scst_rewards(scorer, sampled, greedy, [references[i] for i in order.tolist()])
            advantages = torch.from_numpy(rewards.advantages).to(device)
            loss = policy_loss(drawn.logprobs, advantages)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), options.grad_clip)
            optimizer.step()
            sample_sum += float(rewards.samples.mean(axis=1).sum())
            greedy_sum += float(rewards.greedy.sum())
            loss_sum += float(loss.detach()) * len(rows)
            n_images += len(rows)
            progress.update(task, advance=1, reward=sample_sum / n_images)
    seconds = time.perf_counter() - started
    return {"loss": loss_sum / max(n_images, 1), "sample_reward": sample_sum / max(n_images, 1),
            "greedy_reward": greedy_sum / max(n_images, 1), "samples_per_s": n_images / seconds,
            "seconds": seconds}


def _summary(out: Path, history: list[dict[str, Any]], best_cider: float) -> None:
    table = Table(title=f"SCST run {out}")
    for column in ("epoch", "sample reward", "greedy reward", "val CIDEr-D (0–100)", "val BLEU-4", "seconds"):
        table.add_column(column, justify="right")
    for line in history:
        table.add_row(str(line["epoch"]), f"{line['sample_reward']:.3f}", f"{line['greedy_reward']:.3f}",
                      f"{100 * line['val_cider_d']:.1f}", f"{100 * line['val_bleu4']:.1f}", f"{line['seconds']:.0f}")
    console.print(table)
    console.print(f"best validation CIDEr-D {100 * max(best_cider, 0):.1f}; checkpoints in {out}")
