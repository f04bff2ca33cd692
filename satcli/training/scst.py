"""``satcli train --scst --init CKPT``: self-critical sequence training (Rennie et al., 2017).

A trained captioner (``--init``) is fine-tuned to maximise the CIDEr-D of its own captions instead of the
likelihood of the references. For every training image, ``scst_samples`` captions are drawn from the model
and one is decoded greedily; each sample's reward is its CIDEr-D against the image's reference captions
(document frequencies from the whole training split), and the greedy caption's CIDEr-D is the baseline:

    loss = - mean over samples of (CIDEr-D(sample) - CIDEr-D(greedy)) · log p(sample)

so a sample better than what the model would say anyway is made more likely, a worse one less. As in Rennie et
al. (appendix) and ruotianluo/self-critical.pytorch (``array_to_str`` keeps the end token; ``prepro_ngrams``
counts it in the document frequencies), the reward scores the end token as a word on both sides: a caption that
wrote ``<end>`` carries it, every reference carries it, so a caption cut short ("... on a") loses the n-grams
that end a sentence. A caption cut at ``max_length`` without ``<end>`` has none. Greedy baseline and samples
never write ``<unk>``, the rule of ``satcli caption`` (:func:`satcli.data.vocab.banned_words`). Checkpoints
are the ordinary format (``best.pt`` by validation CIDEr-D, ``last.pt`` with the optimiser and RNG state for
``--resume``), so evaluate and caption use them unchanged. The encoder stays frozen (cached features). As in
Rennie et al., the reward is the whole objective: the attention regulariser (``--doubly-stochastic``) belongs
to cross-entropy training and is not added here. The run folder, checkpoints, metrics and resume are
:mod:`satcli.training.run`'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.captioner import Captioner, CaptionerConfig
from models.decoding import DecodingOptions, decode, sample
from satcli.core.console import console, make_progress
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError, first_line
from satcli.data.features import cached_features
from satcli.data.store import StoredDataset
from satcli.data.text import tokenize
from satcli.data.vocab import END, END_ID, Vocabulary, banned_words
from satcli.formats.checkpoint import build_captioner, read_checkpoint
from satcli.scoring.decode import decode_split, feature_chunks, validation_scores
from satcli.scoring.metrics import CiderD
from satcli.training.batches import image_features, image_plan
from satcli.training.distributed import Ranks
from satcli.training.options import TrainOptions, TrainResult
from satcli.training.run import (
    LAST,
    Run,
    Trained,
    open_run,
    plateau_scheduler,
    restore,
    run_epochs,
    run_folder,
    validation_split,
)


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


def reward_words(ids: Sequence[int], vocab: Vocabulary) -> list[str]:
    """A caption's words as its reward scores them: up to and including ``<end>`` when ``ids`` hold one (as
    ruotianluo's ``array_to_str`` keeps the end token), without ``<start>`` and ``<pad>``."""
    words = vocab.decode(ids)
    return [*words, END] if END_ID in ids else words


def reward_references(references: Sequence[Sequence[Sequence[str]]]) -> list[list[list[str]]]:
    """Every reference caption with the end token after its last word (both sides of the reward carry it)."""
    return [[[*ref, END] for ref in refs] for refs in references]


class CiderReward:
    """The SCST reward: CIDEr-D with the end token as a word on both sides, document frequencies from the
    training references (``references[i]``: image i's tokenised captions, without the end token)."""

    def __init__(self, references: Sequence[Sequence[Sequence[str]]]):
        self.references = reward_references(references)
        self.scorer = CiderD(self.references)

    def rewards(self, sampled: Sequence[Sequence[Sequence[int]]], greedy: Sequence[Sequence[int]],
                rows: Sequence[int], vocab: Vocabulary) -> Rewards:
        """``sampled[b][k]``: the ids of sample k of image ``rows[b]`` (``<end>`` included when written);
        ``greedy[b]`` the greedy caption's ids, likewise."""
        words = [[reward_words(ids, vocab) for ids in per_image] for per_image in sampled]
        return scst_rewards(self.scorer, words, [reward_words(ids, vocab) for ids in greedy],
                            [self.references[i] for i in rows])


def policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-mean_k (A_k · log p(sample_k)). logprobs (B, n, T) per token, 0 after <end>; advantages (B, n)."""
    return -(advantages.to(logprobs.dtype) * logprobs.sum(dim=2)).mean()


def scst_optimizer(model: Captioner, options: TrainOptions) -> torch.optim.Optimizer:
    """Adam on the decoder at ``options.scst_lr`` (not the cross-entropy ``decoder_lr``, 8× larger by default)."""
    return torch.optim.Adam(model.decoder.parameters(), lr=options.scst_lr)


def scst_epoch(model: Captioner, optimizer: torch.optim.Optimizer, features: np.ndarray,
                reward: CiderReward, vocab: Vocabulary, options: TrainOptions, epoch: int,
                device: torch.device) -> dict[str, Any]:
    """One pass over the training images; returns the epoch's mean rewards and rates."""
    plan = image_plan(len(features), options.batch_size, options.seed, epoch)
    progress = make_progress()
    task = progress.add_task(f"SCST epoch {epoch + 1}/{options.epochs}", total=len(plan), unit="steps")
    sample_sum = greedy_sum = loss_sum = 0.0
    n_images = 0
    started = time.perf_counter()
    banned = banned_words(allow_unk=False)
    model.train()
    with progress:
        for rows in plan:
            batch, order = image_features(features, rows, device)
            greedy = [[*r.tokens, END_ID] if r.best.finished else r.tokens
                      for r in decode(model, batch, beam_size=1, max_length=options.val_max_length, banned_ids=banned)]
            drawn = sample(model, batch, options.scst_samples, options.val_max_length, banned)
            rewards = reward.rewards(drawn.tokens.cpu().tolist(), greedy, order.tolist(), vocab)
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
            progress.update(task, advance=1, detail=f"reward {sample_sum / n_images:.3f}")
    seconds = time.perf_counter() - started
    return {"loss": loss_sum / max(n_images, 1), "sample_reward": sample_sum / max(n_images, 1),
            "greedy_reward": greedy_sum / max(n_images, 1), "samples_per_s": n_images / seconds,
            "seconds": seconds}


def train_scst(options: TrainOptions, ranks: Ranks) -> TrainResult:
    """Self-critical fine-tuning as ``options`` say (``options.scst``; ``options.init`` or ``--resume``)."""
    if ranks.world > 1:
        raise SatcliError("--scst trains on one process; run it without torchrun")
    out = run_folder(options, f"{options.dataset}-scst")
    options, resume_from = open_run(options, out, ranks)
    if resume_from is None and options.init is None:
        raise SatcliError("--scst fine-tunes a trained model: name it with --init CKPT")
    start = resume_from if resume_from is not None else read_checkpoint(options.init)  # type: ignore[arg-type]
    if options.scst_samples < 1:
        raise SatcliError(f"--scst-samples must be at least 1, got {options.scst_samples}")
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)

    dataset = StoredDataset.open(options.data_root, options.dataset)
    source = out / LAST if resume_from is not None else Path(options.init)  # type: ignore[arg-type]
    if list(start["vocab"]) != dataset.vocab.to_list():
        raise SatcliError(f"the model's vocabulary is not the one of dataset {options.dataset!r}; SCST must use "
                          "the dataset the model was trained on", source)
    model = _model(start, source, device)
    val_split = validation_split(dataset)
    optimizer = scst_optimizer(model, options)
    run = Run(out, options, ranks, device, model, dataset.vocab, optimizer, plateau_scheduler(optimizer, options),
              val_split)
    if resume_from is not None:
        restore(run, resume_from, "cider_d")
    return run_epochs(run, Scst(run, dataset, before=resume_from is None))


def _model(checkpoint: dict[str, Any], source: Path, device: torch.device) -> Captioner:
    try:
        model = build_captioner(CaptionerConfig.from_dict(checkpoint["config"]), checkpoint["state_dict"], source)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise SatcliError(f"checkpoint does not describe a valid model: {first_line(error)}",
                          source) from error
    model.to(device)
    model.encoder.set_fine_tuning(0)
    return model


class Scst:
    """The SCST job: its epoch (sampled captions rewarded by CIDEr-D) and CIDEr-D validation."""

    metric = "cider_d"

    def __init__(self, run: Run, dataset: StoredDataset, before: bool):
        """``before``: score the starting model first (a new run, not a resumed one)."""
        self.run = run
        self.train_features = cached_features(dataset, "train", run.model, run.device)
        self.val_features = cached_features(dataset, run.val_split, run.model, run.device)
        self.train_refs = [[tokenize(c) for c in captions] for captions in dataset.captions("train")]
        self.val_refs = [[tokenize(c) for c in captions] for captions in dataset.captions(run.val_split)]
        self.reward = CiderReward(self.train_refs)
        if before:
            scores = self.score()
            console.print(f"before SCST: val CIDEr-D {100 * scores['cider_d']:.1f}  BLEU-4 {100 * scores['bleu4']:.1f}")

    def epoch(self, epoch: int) -> Trained:
        run = self.run
        line = scst_epoch(run.model, run.optimizer, self.train_features, self.reward, run.vocab, run.options, epoch,
                          run.device)
        return Trained(line, {"scst": True})

    def score(self) -> dict[str, float]:
        """BLEU-1..4 and CIDEr-D (document frequencies from the validation references) of decoded captions."""
        run, options = self.run, self.run.options
        decoding = DecodingOptions(beam_size=options.val_beam_size, max_length=options.val_max_length,
                                   banned_ids=banned_words(allow_unk=False))
        (decoded,) = decode_split(run.model, feature_chunks(self.val_features, 100), [decoding], run.device)
        return validation_scores(self.val_refs, [run.vocab.decode(r.tokens) for r in decoded.results], cider=True)

    def learning_rates(self) -> dict[str, float]:
        return {"decoder": self.run.optimizer.param_groups[0]["lr"]}

    def extra_state(self, rng_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def report(self, epoch: int, line: dict[str, Any], improved: bool) -> None:
        console.print(f"epoch {epoch + 1}: reward {line['sample_reward']:.3f} (greedy {line['greedy_reward']:.3f})"
                      f"  val CIDEr-D {100 * line['val_cider_d']:.1f}  BLEU-4 {100 * line['val_bleu4']:.1f}"
                      f"{'  (best)' if improved else ''}")

    def close(self) -> None:
        pass
