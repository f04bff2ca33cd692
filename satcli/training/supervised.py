"""Cross-entropy training (teacher forcing), the job of a plain ``satcli train`` run.

- Frozen encoder (the default): every image is encoded once into the feature cache (:mod:`satcli.data.features`)
  and training costs decoder time only. ``--fine-tune-encoder`` (from epoch ``fine_tune_after``) runs the
  encoder in the loop on augmented images instead.
- Batches are bucketed by caption length (shuffled chunks sorted by length), so padding costs nothing.
- Adam with separate encoder/decoder learning rates, gradient clipping, learning-rate decay on plateau and
  early stopping, all driven by validation BLEU-4 of *decoded* captions, never of teacher-forced outputs.
- ``torchrun --nproc_per_node N -m satcli train ...`` trains with DDP: every rank takes its share of each
  global batch and the loss is normalised by the global batch, so results do not depend on the rank count.

The run folder, checkpoints, metrics, resume and early stopping are :mod:`satcli.training.run`'s.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.captioner import (
    Captioner,
    bag_of_words_loss,
    caption_loss,
    coverage_loss,
    doubly_stochastic_penalties,
    hard_attention_loss,
    unlikelihood_loss,
)
from models.data import DataConfig
from models.decoding import DecodingOptions
from models.encoders import ENCODERS, PretrainedWeightsUnavailable
from satcli.core.console import console, make_progress
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.core.steplog import StepLog, require_tensorboard
from satcli.core.threads import follow_machine
from satcli.data.features import cached_features
from satcli.data.store import StoredDataset
from satcli.data.text import tokenize
from satcli.data.views import FLIP_VIEW, FeatureViews
from satcli.data.vocab import Vocabulary, banned_words
from satcli.formats.checkpoint import build_captioner
from satcli.scoring.decode import decode_split, split_chunks, validation_scores
from satcli.training.batches import (
    CaptionTable,
    FeatureFlips,
    FeatureShifts,
    batch_plan,
    feature_batches,
    flip_table,
    image_batch_plan,
    image_batches,
    prefetch,
)
from satcli.training.distributed import Ranks, all_reduce, barrier, distributed
from satcli.training.options import TrainOptions, TrainResult, check_grid, check_resume_vocabulary
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


class Stepper:
    """One optimiser step on one batch: forward, loss normalised by the global batch, backward, clip, update.

    The training loop and ``bench/train_throughput.py`` both call this, so the benchmark times what trains.
    """

    def __init__(self, model: Captioner, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, options: TrainOptions, ranks: Ranks, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        self.model, self.train_model, self.optimizer, self.scaler = model, train_model, optimizer, scaler
        self.options, self.ranks, self.device, self.amp_dtype = options, ranks, device, amp_dtype

    def __call__(self, features: torch.Tensor | None, tokens: torch.Tensor, lengths: torch.Tensor, global_n: int,
                 global_tokens: int, images: torch.Tensor | None = None,
                 per_caption: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, L, D) — or images (I, 3, S, S) with per_caption (B,) image index — tokens (B, T+1),
        lengths (B,). Returns the loss of the global batch, detached and on the device (no sync here)."""
        device, options = self.device, self.options
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            if images is not None:
                features = self.model.encode(images.to(device, non_blocking=True))[per_caption.to(device)]
            else:
                features = features.to(device, non_blocking=True)
            tokens, lengths = tokens.to(device, non_blocking=True), lengths.to(device, non_blocking=True)
            output = self.train_model(features, tokens, lengths, options.scheduled_sampling)
            logprobs, alphas = output.logprobs, output.alphas
            _, nll = caption_loss(logprobs, alphas, tokens, lengths, 0.0)
            penalty = doubly_stochastic_penalties(alphas).sum()  # the mean over cells, summed over captions
            # normalised by the global batch, so the DDP average over ranks equals the one-process loss
            loss = (nll * int(lengths.sum()) / global_tokens
                    + options.doubly_stochastic * penalty / global_n) * self.ranks.world
            if output.word_logits is not None:  # --words-loss: the bag-of-words head, per caption as the penalty
                words = bag_of_words_loss(output.word_logits, tokens, lengths, self.model.config.end_id).sum()
                loss = loss + options.words_loss * words / global_n * self.ranks.world
            if options.unlikelihood > 0:  # --unlikelihood: the earlier words of the caption, per token as the NLL
                repeats = unlikelihood_loss(logprobs, tokens, lengths)
                loss = loss + options.unlikelihood * repeats / global_tokens * self.ranks.world
            if options.coverage_loss > 0:  # --coverage-loss: attention falling again where it fell, per token
                again = coverage_loss(alphas)
                loss = loss + options.coverage_loss * again / global_tokens * self.ranks.world
            objective = loss
            if output.location_logprob is not None:  # hard attention: REINFORCE and entropy, per token too
                objective = loss + hard_attention_loss(self.model, output, tokens) / global_tokens * self.ranks.world
        self.scaler.scale(objective).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                       options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach() / self.ranks.world


def validate(model: Captioner, dataset: StoredDataset, split: str, vocab: Vocabulary, device: torch.device,
             features: np.ndarray | None, beam_size: int, max_length: int, batch_size: int = 100) -> dict[str, float]:
    """BLEU-1..4 of captions *decoded* from ``split`` (cached features when given, else images), ``<unk>`` banned
    as ``satcli caption`` and ``evaluate`` ban it, so best.pt is chosen on the captions users get."""
    references = [[tokenize(c) for c in captions] for captions in dataset.captions(split)]
    with make_progress() as progress:
        task = progress.add_task(f"validating on {split}", total=len(references), unit="images")
        chunks = split_chunks(dataset, split, model, device, batch_size, features, progress, f"encoding {split}")
        decoding = DecodingOptions(beam_size=beam_size, max_length=max_length, banned_ids=banned_words(allow_unk=False))
        (decoded,) = decode_split(model, chunks, [decoding], device, lambda n: progress.advance(task, n))
    return validation_scores(references, [vocab.decode(result.tokens) for result in decoded.results])


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}


def train_supervised(options: TrainOptions, ranks: Ranks) -> TrainResult:
    """Cross-entropy training as ``options`` say, on this process's rank."""
    out = run_folder(options, options.dataset)
    options, resume_from = open_run(options, out, ranks)
    if options.encoder not in ENCODERS:
        raise SatcliError(f"unknown encoder {options.encoder!r}; choose one of {', '.join(ENCODERS)}")
    device = resolve_device(options.device)
    if options.tensorboard:
        require_tensorboard()  # before the long feature caching, not after
    torch.manual_seed(options.seed + ranks.rank)
    random.seed(options.seed)

    dataset = StoredDataset.open(options.data_root, options.dataset)
    if resume_from is not None:
        check_resume_vocabulary(resume_from, dataset.vocab, options.dataset, out / LAST)
    val_split = validation_split(dataset)
    check_grid(options, dataset)
    model = _model(options, len(dataset.vocab), resume_from, device, out / LAST)
    table = CaptionTable.from_store(dataset, "train")
    optimizer = _optimizer(model, options)
    run = Run(out, options, ranks, device, model, dataset.vocab, optimizer, plateau_scheduler(optimizer, options),
              val_split)
    if resume_from is not None:
        restore(run, resume_from, "bleu4")
    return run_epochs(run, Supervised(run, dataset, table, resume_from))


def _model(options: TrainOptions, vocab_size: int, resume_from: dict[str, Any] | None,
           device: torch.device, last: Path) -> Captioner:
    """A new model, or on ``--resume`` one holding ``last.pt``'s weights, its sizes checked against them first
    (the stored options are read from the file: a crafted one must not size a huge allocation)."""
    if resume_from is not None:
        return build_captioner(options.model_config(vocab_size), resume_from["state_dict"], last).to(device)
    try:
        model = Captioner(options.model_config(vocab_size), pretrained_encoder=options.pretrained)
    except PretrainedWeightsUnavailable as error:
        raise SatcliError(str(error)) from None
    return model.to(device)


def _optimizer(model: Captioner, options: TrainOptions) -> torch.optim.Optimizer:
    """Adam on the decoder, and on the encoder's top ``fine_tune_blocks`` when it will be fine-tuned."""
    optimizer = torch.optim.Adam([{"params": list(model.decoder.parameters()), "lr": options.decoder_lr,
                                   "name": "decoder"}])
    if options.fine_tune_encoder:
        model.encoder.set_fine_tuning(options.fine_tune_blocks)
        optimizer.add_param_group({"params": [p for p in model.encoder.parameters() if p.requires_grad],
                                   "lr": options.encoder_lr, "name": "encoder"})
        model.encoder.set_fine_tuning(0)  # frozen until fine_tune_after
    return optimizer


class Supervised:
    """The cross-entropy job: its epoch (cached features or, when fine-tuning, images) and BLEU-4 validation."""

    metric = "bleu4"

    def __init__(self, run: Run, dataset: StoredDataset, table: CaptionTable, resume_from: dict[str, Any] | None):
        self.run, self.dataset, self.table = run, dataset, table
        options, model, device, ranks = run.options, run.model, run.device, run.ranks
        use_amp = options.amp and device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        if resume_from is not None and resume_from["train_state"].get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(resume_from["train_state"]["scaler"])
        if options.compile:
            model.decoder.step = torch.compile(model.decoder.step, dynamic=True)  # type: ignore[method-assign]
        self.stepper = Stepper(model, model, run.optimizer, self.scaler, options, ranks, device,
                               amp_dtype if use_amp else None)
        self.wrapped_tuning: bool | None = None  # whether the DDP wrapper was built with the encoder trainable
        self.tuning = False
        self.steps_per_epoch = 0
        start = run.standing.start_epoch
        needs_cache = not options.fine_tune_encoder or options.fine_tune_after > start
        views = range(options.feature_views + 1) if needs_cache else range(0)  # 0: the plain features
        self.val_features = None
        if ranks.main:  # the main rank fills the caches; the others then read them
            self.train_views = [cached_features(dataset, "train", model, device, view=v) for v in views]
            if needs_cache:
                self.val_features = cached_features(dataset, run.val_split, model, device)
        barrier(ranks)
        if not ranks.main:
            self.train_views = [cached_features(dataset, "train", model, device, view=v) for v in views]
        self.train_features = self.train_views[0] if self.train_views else None
        # --feature-flips: the mirrored training pictures, a cached view of their own (main rank first)
        self.train_mirrored = None
        if options.feature_flips and needs_cache:
            if ranks.main:
                self.train_mirrored = cached_features(dataset, "train", model, device, view=FLIP_VIEW)
            barrier(ranks)
            if not ranks.main:
                self.train_mirrored = cached_features(dataset, "train", model, device, view=FLIP_VIEW)
        self.flip = flip_table(run.vocab)
        self.preprocessing = DataConfig.for_config(model.config)
        self.steps = StepLog(run.out, keep_epochs=start, tensorboard=options.tensorboard) if ranks.main else None

    def _batches(self, plan: list[torch.Tensor], epoch: int) -> Iterator[Any]:
        run, options = self.run, self.run.options
        if self.tuning:
            return image_batches(self.dataset, self.table, plan, run.ranks, self.preprocessing, self.flip,
                                 options.seed, epoch)
        flips = FeatureFlips.for_epoch(self.train_mirrored, self.flip, len(self.table), options.seed, epoch) \
            if self.train_mirrored is not None else None
        shifts = FeatureShifts.for_epoch(run.model.grid_shape, len(self.table), options.seed, epoch) \
            if options.feature_shifts else None
        views = (self.train_views, FeatureViews.for_epoch(options.feature_views, len(self.table), options.seed,
                                                          epoch)) if options.feature_views else None
        return feature_batches(self.train_features, self.table, plan, run.ranks, flips, shifts, views)

    def _start_epoch(self, epoch: int) -> None:
        """Set the encoder trainable or frozen for this epoch (rebuilding the DDP wrapper when that changes)."""
        run, options = self.run, self.run.options
        self.tuning = options.fine_tune_encoder and epoch >= options.fine_tune_after
        run.model.encoder.set_fine_tuning(options.fine_tune_blocks if self.tuning else 0)
        if run.ranks.world > 1 and self.tuning != self.wrapped_tuning:
            # DDP all-reduces only the parameters trainable when it is built: rebuild it once the encoder
            # trains, or every rank's encoder would drift apart (rank 0 saving one tuned on 1/world of the data)
            self.stepper.train_model, self.wrapped_tuning = distributed(run.model, run.device), self.tuning
        run.model.train()

    def epoch(self, epoch: int) -> Trained:
        run, options, ranks = self.run, self.run.options, self.run.ranks
        self._start_epoch(epoch)
        plan = image_batch_plan(self.table.image, options.batch_size, options.seed, epoch) if self.tuning \
            else batch_plan(self.table.lengths, options.batch_size, options.seed, epoch)
        self.steps_per_epoch = len(plan)
        progress = make_progress() if ranks.main else None
        try:
            if progress:
                progress.start()
                task = progress.add_task(f"epoch {epoch + 1}/{options.epochs}", total=len(plan), unit="steps")
            started, n_samples, n_tokens, n_steps = time.perf_counter(), 0, 0, 0
            loss_sum = torch.zeros((), device=run.device)
            for batch in prefetch(self._batches(plan, epoch)):
                follow_machine()  # other work arrived, or left: give way, or take the cores back
                if self.tuning:
                    images, per_caption, tokens, lengths, global_n, global_tokens = batch
                    loss = self.stepper(None, tokens, lengths, global_n, global_tokens, images, per_caption)
                else:
                    features, tokens, lengths, global_n, global_tokens = batch
                    loss = self.stepper(features, tokens, lengths, global_n, global_tokens)
                n_steps, n_samples, n_tokens = n_steps + 1, n_samples + global_n, n_tokens + global_tokens
                loss_sum += loss
                if self.steps:
                    self.steps.step(epoch + 1, epoch * len(plan) + n_steps, loss * ranks.world,
                                    learning_rates(run.optimizer))
                if progress and (n_steps == 1 or n_steps % 20 == 0):  # reading the loss waits for the device
                    progress.update(task, advance=1, detail=f"loss {float(loss_sum) / n_steps:.3f}")
                elif progress:
                    progress.advance(task)
            all_reduce(loss_sum, ranks)  # each rank returned its share of every global batch's loss
            mean_loss = float(loss_sum) / max(n_steps, 1)
            seconds = time.perf_counter() - started
        finally:
            if progress:
                progress.stop()
        return Trained({"loss": mean_loss},
                       {"samples_per_s": n_samples / seconds, "tokens_per_s": n_tokens / seconds,
                        "seconds": seconds, "encoder_tuning": self.tuning, "ranks": ranks.world})

    def score(self) -> dict[str, float]:
        run, options = self.run, self.run.options
        return validate(run.model, self.dataset, run.val_split, run.vocab, run.device,
                        None if self.tuning else self.val_features, options.val_beam_size, options.val_max_length)

    def learning_rates(self) -> dict[str, float]:
        return learning_rates(self.run.optimizer)

    def extra_state(self, rng_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {"rng_ranks": rng_ranks, "scaler": self.scaler.state_dict()}

    def report(self, epoch: int, line: dict[str, Any], improved: bool) -> None:
        self.steps.epoch(epoch + 1, (epoch + 1) * self.steps_per_epoch,
                         {k: v for k, v in line.items() if k.startswith("val_")})
        console.print(f"epoch {epoch + 1}: loss {line['loss']:.3f}  val BLEU-4 {100 * line['val_bleu4']:.1f}"
                      f"{'  (best)' if improved else ''}  {line['samples_per_s']:.0f} captions/s")

    def close(self) -> None:
        if self.steps:
            self.steps.close()
