"""``satcli train``: teacher-forced training of the captioner on a preprocessed dataset.

- Frozen encoder (the default): every image is encoded once into the feature cache (:mod:`satcli.features`)
  and training costs decoder time only. ``--fine-tune-encoder`` (from epoch ``fine_tune_after``) runs the
  encoder in the loop on augmented images instead.
- Batches are bucketed by caption length (shuffled chunks sorted by length), so padding costs nothing.
- Adam with separate encoder/decoder learning rates, gradient clipping, learning-rate decay on plateau and
  early stopping, all driven by validation BLEU-4 of *decoded* captions, never of teacher-forced outputs.
- Every epoch writes ``last.pt`` (with optimiser, scheduler and RNG state, so ``--resume`` continues exactly)
  and, when validation improves, ``best.pt``; both atomically. ``metrics.jsonl`` holds one line per epoch.
- ``torchrun --nproc_per_node N -m satcli train ...`` trains with DDP: every rank takes its share of each
  global batch and the loss is normalised by the global batch, so results do not depend on the rank count.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import TextColumn
from rich.table import Table

from models.captioner import (
    Captioner,
    CaptionerConfig,
    caption_loss,
    doubly_stochastic_penalties,
    hard_attention_loss,
)
from models.data import DataConfig, normalise, resize
from models.decoding import decode
from models.encoders import DEFAULT_ENCODER, ENCODERS, PretrainedWeightsUnavailable
from satcli.checkpoint import read_checkpoint, save_checkpoint
from satcli.console import console, make_progress
from satcli.device import resolve_device
from satcli.errors import SatcliError
from satcli.features import cached_features, encode_split
from satcli.metrics import bleu
from satcli.steplog import STEPS, StepLog, require_tensorboard
from satcli.store import StoredDataset
from satcli.text import tokenize
from satcli.vocab import Vocabulary

log = logging.getLogger(__name__)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


@dataclass
class TrainOptions:
    """Everything that steers a training run. Stored in every checkpoint it writes."""

    dataset: str
    data_root: Path = Path("data")
    out: Path | None = None  # default runs/<dataset>
    resume: bool = False
    overwrite: bool = False
    # model
    encoder: str = DEFAULT_ENCODER
    attention: str = "soft"
    image_size: int | None = None
    grid_size: int | None = None
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    deep_output: bool = True
    doubly_stochastic: float = 1.0
    # schedule
    epochs: int = 30
    batch_size: int = 64  # captions per optimiser step, over all ranks
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    grad_clip: float = 5.0
    lr_decay: float = 0.8  # multiply learning rates by this ...
    lr_patience: int = 3  # ... after this many epochs without validation improvement
    patience: int = 10  # stop after this many epochs without improvement
    scheduled_sampling: float = 0.0
    fine_tune_encoder: bool = False
    fine_tune_after: int = 0  # epoch (0-based) from which the encoder trains
    # with fine-tuning: the top N blocks (-1: all, stem included). 6: EfficientNet-Lite's stride-32 stage and head;
    # the low blocks keep their generic ImageNet filters, as the reference code keeps ResNet's stem and layer1
    fine_tune_blocks: int = 6
    feature_flips: bool = False  # frozen encoder: mirror half the cached feature grids, swapping left/right words
    feature_shifts: bool = False  # frozen encoder: move cached feature grids by up to a cell (a small crop)
    val_beam_size: int = 1
    val_max_length: int = 30
    # self-critical fine-tuning (satcli.scst): CIDEr-D reward, greedy baseline
    scst: bool = False
    init: Path | None = None  # the trained checkpoint SCST starts from
    scst_samples: int = 5  # captions sampled per image and step
    scst_lr: float = 5e-5  # SCST's decoder learning rate: ~1/8 of cross-entropy's, as usual for SCST
    # machinery
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (bf16 where supported)
    compile: bool = False
    tensorboard: bool = False  # also write TensorBoard event files to <out>/tensorboard (needs tensorboard)
    seed: int = 0
    pretrained: bool = True
    # the options the user gave (the CLI fills it in); None: those that differ from their defaults. Not stored.
    given: frozenset[str] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "given"}

    def given_names(self) -> set[str]:
        if self.given is not None:
            return set(self.given)
        return {f.name for f in fields(self) if f.name != "given" and f.default is not MISSING
                and getattr(self, f.name) != f.default}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOptions:
        known = {f.name: f for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        for key in ("data_root", "out", "init"):
            if kept.get(key) is not None:
                kept[key] = Path(kept[key])
        return cls(**kept)

    def model_config(self, vocab_size: int) -> CaptionerConfig:
        return CaptionerConfig(
            vocab_size=vocab_size, encoder=self.encoder, image_size=self.image_size, grid_size=self.grid_size,
            fine_tune_blocks=0, attention=self.attention, embed_dim=self.embed_dim,
            attention_dim=self.attention_dim, decoder_dim=self.decoder_dim, dropout=self.dropout,
            deep_output=self.deep_output, doubly_stochastic=self.doubly_stochastic)


@dataclass
class TrainResult:
    out: Path
    best: Path
    last: Path
    epochs: int
    best_bleu4: float
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Ranks and devices
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def _barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def _broadcast(value: Any, ranks: Ranks) -> Any:
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CaptionTable:
    """Every caption of a split as one padded tensor: row i is caption i of image ``image[i]``."""

    image: torch.Tensor  # (n_captions,) row of the image in the split
    tokens: torch.Tensor  # (n_captions, T+1) <start> … <end> <pad>…
    lengths: torch.Tensor  # (n_captions,) words + 1

    @classmethod
    def from_store(cls, dataset: StoredDataset, split: str) -> CaptionTable:
        rows = dataset.token_ids(split)
        pairs = [(i, ids) for i, captions in enumerate(rows) for ids in captions if len(ids) >= 2]
        if not pairs:
            raise SatcliError(f"the {split} split has no captions to train on", dataset.root)
        width = max(len(ids) for _, ids in pairs)
        tokens = torch.zeros(len(pairs), width, dtype=torch.long)
        for n, (_, ids) in enumerate(pairs):
            tokens[n, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) - 1 for _, ids in pairs])
        return cls(torch.tensor([i for i, _ in pairs]), tokens, lengths)

    def __len__(self) -> int:
        return len(self.lengths)


def batch_plan(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Caption indices per batch for one epoch: shuffled, then sorted by length inside chunks of 32 batches so
    each batch holds captions of similar length, then the batches shuffled. A function of (seed, epoch) alone,
    so every rank and every resumed run sees the same plan."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[torch.Tensor] = []
    chunk = batch_size * 32
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[lengths[part].argsort(descending=True, stable=True)]
        batches.extend(part.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run an iterator ``depth`` items ahead in a thread, so loading overlaps compute."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = []
        for _ in range(depth):
            queue.append(pool.submit(next, items, None))
        while True:
            item = queue.pop(0).result()
            if item is None:
                return
            queue.append(pool.submit(next, items, None))
            yield item


def _feature_batches(features: np.ndarray, table: CaptionTable, plan: list[torch.Tensor], ranks: Ranks,
                     flips: FeatureFlips | None = None, shifts: FeatureShifts | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]]:
    """(features, tokens, lengths, global captions, global tokens) of this rank's share of each batch; with
    ``flips``, half the captions see their image's feature grid mirrored left-right and say right for left;
    with ``shifts``, grids move by up to a cell."""
    for batch in plan:
        if len(batch) < ranks.world:
            continue
        global_tokens = int(table.lengths[batch].sum())
        mine = batch.tensor_split(ranks.world)[ranks.rank]
        lengths = table.lengths[mine]
        tokens = table.tokens[mine, : int(lengths.max()) + 1]
        rows = table.image[mine].numpy()
        grids = torch.from_numpy(np.asarray(features[rows], dtype=np.float32))
        if flips is not None:
            grids, tokens = flips(grids, tokens, mine)
        if shifts is not None:
            grids = shifts(grids, mine)
        yield grids, tokens, lengths, len(batch), global_tokens


# Words a horizontal flip turns into each other. A flip that would contradict a caption is never made:
# the words are swapped along with the pixels.
FLIP_PAIRS = (("left", "right"), ("leftmost", "rightmost"))


def _flip_table(vocab: Vocabulary) -> torch.Tensor:
    mapping = torch.arange(len(vocab))
    for a, b in FLIP_PAIRS:
        if a in vocab and b in vocab:
            mapping[vocab.id(a)], mapping[vocab.id(b)] = vocab.id(b), vocab.id(a)
    return mapping


@dataclass
class FeatureFlips:
    """Mirror cached (B, H*W, D) feature grids left-right for a seeded half of the captions, swapping the words
    ``left``/``right`` with them (the flip that encoder fine-tuning applies to pixels, on the cache)."""

    grid_shape: tuple[int, int]
    swap: torch.Tensor  # vocabulary id → id after a flip
    chosen: torch.Tensor  # (n_captions,) bool: which captions see the mirrored grid this epoch

    @classmethod
    def for_epoch(cls, grid_shape: tuple[int, int], swap: torch.Tensor, n_captions: int, seed: int,
                  epoch: int) -> FeatureFlips:
        # A function of (seed, epoch) alone, so every rank and every resumed run flips the same captions.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 17)
        return cls(grid_shape, swap, torch.rand(n_captions, generator=generator) < 0.5)

    def __call__(self, grids: torch.Tensor, tokens: torch.Tensor, captions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """grids (B, H*W, D), tokens (B, T+1), captions (B,) their index in the caption table."""
        flipped = self.chosen[captions]
        if not flipped.any():
            return grids, tokens
        height, width = self.grid_shape
        grids, tokens = grids.clone(), tokens.clone()
        dim = grids.shape[-1]
        grids[flipped] = grids[flipped].view(-1, height, width, dim).flip(2).reshape(-1, height * width, dim)
        tokens[flipped] = self.swap[tokens[flipped]]
        return grids, tokens


@dataclass
class FeatureShifts:
    """Translate cached (B, H*W, D) feature grids by up to one cell each way, edge cells repeated: what a small
    random crop does to the grid. Left stays left of right, so captions need no change."""

    grid_shape: tuple[int, int]
    offsets: torch.Tensor  # (n_captions, 2) long: (dy, dx) in {-1, 0, 1} per caption this epoch

    @classmethod
    def for_epoch(cls, grid_shape: tuple[int, int], n_captions: int, seed: int, epoch: int) -> FeatureShifts:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 29)
        return cls(grid_shape, torch.randint(-1, 2, (n_captions, 2), generator=generator))

    def __call__(self, grids: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """grids (B, H*W, D), captions (B,) their index in the caption table."""
        height, width = self.grid_shape
        n, _, dim = grids.shape
        dy, dx = self.offsets[captions].unbind(1)
        rows = (torch.arange(height)[None, :] - dy[:, None]).clamp(0, height - 1)  # (B, H): cell y shows y - dy
        cols = (torch.arange(width)[None, :] - dx[:, None]).clamp(0, width - 1)  # (B, W)
        moved = grids.view(n, height, width, dim)[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return moved.reshape(n, height * width, dim)


def _image_batches(dataset: StoredDataset, table: CaptionTable, plan: list[torch.Tensor], ranks: Ranks,
                   preprocessing: DataConfig, flip: torch.Tensor, seed: int, epoch: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]]:
    """For encoder fine-tuning: (images, image index per caption, tokens, lengths, global captions, tokens).

    Images are read from the store by row, decoded, jittered a little in scale and position, and flipped
    left-right half of the time together with the words ``left``/``right``. No colour jitter: colours are
    words in captions.
    """
    import pyarrow.parquet as pq

    file = pq.ParquetFile(dataset.path("train"))
    group_of = np.cumsum([file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
    cache: dict[int, list[bytes]] = {}
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)

    def image_bytes(row: int) -> bytes:
        group = int(np.searchsorted(group_of, row, side="right"))
        if group not in cache:
            if len(cache) > 8:
                cache.pop(next(iter(cache)))
            cache[group] = file.read_row_group(group, columns=["image"]).column("image").to_pylist()
        start = 0 if group == 0 else int(group_of[group - 1])
        return cache[group][row - start]

    size = preprocessing.image_size
    for batch in plan:
        if len(batch) < ranks.world:
            continue
        global_tokens = int(table.lengths[batch].sum())
        mine = batch.tensor_split(ranks.world)[ranks.rank]
        rows, per_caption = table.image[mine].unique(return_inverse=True)
        pictures = []
        flips = torch.rand(len(rows), generator=generator) < 0.5
        for row, flipped in zip(rows.tolist(), flips.tolist(), strict=True):
            pixels = resize(dataset.decode_image(image_bytes(row)), preprocessing)
            scale = 1.0 + 0.1 * (float(torch.rand(1, generator=generator)) - 0.5)
            shift = ((torch.rand(2, generator=generator) - 0.5) * 0.08 * size).round().int().tolist()
            pixels = _jitter(pixels, scale, shift)
            pictures.append(pixels.flip(-1) if flipped else pixels)
        lengths = table.lengths[mine]
        tokens = table.tokens[mine, : int(lengths.max()) + 1].clone()
        flipped_caption = flips[per_caption]
        tokens[flipped_caption] = flip[tokens[flipped_caption]]
        yield (normalise(torch.stack(pictures), preprocessing), per_caption, tokens, lengths, len(batch),
               global_tokens)


def _jitter(pixels: torch.Tensor, scale: float, shift: list[int]) -> torch.Tensor:
    """Zoom by ``scale`` about the centre and translate by ``shift`` pixels, edge pixels repeated."""
    import torch.nn.functional as F

    size = pixels.shape[-1]
    theta = torch.tensor([[1 / scale, 0, -2 * shift[0] / size], [0, 1 / scale, -2 * shift[1] / size]])
    grid = F.affine_grid(theta.unsqueeze(0), [1, 3, size, size], align_corners=False)
    out = F.grid_sample(pixels.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# One optimiser step
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def validate(model: Captioner, dataset: StoredDataset, split: str, vocab: Vocabulary, device: torch.device,
             features: np.ndarray | None, beam_size: int, max_length: int, batch_size: int = 100) -> dict[str, float]:
    """BLEU-1..4 of captions *decoded* from ``split`` (cached features when given, else images)."""
    references = [[tokenize(c) for c in captions] for captions in dataset.captions(split)]
    hypotheses: list[list[str]] = []
    with make_progress() as progress:
        task = progress.add_task(f"validating on {split}", total=len(references), unit="images")
        if features is not None:
            chunks: Iterator[torch.Tensor] = (torch.from_numpy(np.asarray(features[i : i + batch_size], np.float32))
                                              for i in range(0, len(features), batch_size))
        else:
            chunks = encode_split(dataset, split, model, device, batch_size, progress, f"encoding {split}")
        for chunk in chunks:
            for result in decode(model, chunk.to(device), beam_size=beam_size, max_length=max_length):
                hypotheses.append(vocab.decode(result.tokens))
            progress.advance(task, len(chunk))
    return bleu(references, hypotheses)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def plateau_scheduler(optimizer: torch.optim.Optimizer,
                      options: TrainOptions) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Multiply the learning rates by ``lr_decay`` once ``lr_patience`` epochs in a row bring no validation
    improvement. (ReduceLROnPlateau's ``patience`` is the number of bad epochs it *tolerates*: it decays on the
    next one, hence ``lr_patience - 1``.)"""
    if options.lr_patience < 1:
        raise SatcliError(f"--lr-patience must be at least 1 (epochs without improvement), got {options.lr_patience}")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=options.lr_decay,
                                                      patience=options.lr_patience - 1)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _own_rng_state(train_state: dict[str, Any], ranks: Ranks) -> dict[str, Any]:
    """This rank's saved RNG state; a run resumed on another number of ranks gives the others fresh seeds."""
    per_rank = train_state.get("rng_ranks") or [train_state["rng"]]
    if len(per_rank) == ranks.world:
        return per_rank[ranks.rank]
    if ranks.main:
        return per_rank[0]
    return {"torch": torch.Generator().manual_seed(1_000_003 * ranks.rank + train_state["epoch"]).get_state()}


def _gather(value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, in rank order (on every rank)."""
    if ranks.world == 1:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def _distributed(model: Captioner, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / f".{METRICS}.tmp"
    tmp.write_text("".join(json.dumps(line) + "\n" for line in history))
    os.replace(tmp, out / METRICS)


# What ``--resume`` takes from the command line: a new end (to extend or shorten the run) and this machine's
# machinery. Every other option is the stored run's, so the resumed run is the run that was started.
RESUME_TAKES = ("epochs", "device", "data_root", "amp", "compile", "tensorboard")


def resumed_options(stored: TrainOptions, given: TrainOptions, out: Path, warn: bool = True) -> TrainOptions:
    """The options of a resumed run: the stored ones, with ``RESUME_TAKES`` from the command line when given
    (``device`` and ``data_root`` always). A warning names every other given option that differs from the
    stored run's and is therefore ignored."""
    explicit = given.given_names()
    taken = {name: getattr(given, name) for name in RESUME_TAKES if name in explicit}
    ignored = [name for name in sorted(explicit - set(RESUME_TAKES) - {"resume", "out", "overwrite"})
               if getattr(given, name) != getattr(stored, name)]
    if ignored and warn:
        log.warning("--resume continues the run in %s with its stored options; ignored: %s", out,
                    ", ".join(f"--{n.replace('_', '-')} {getattr(given, n)} (the run's: {getattr(stored, n)})"
                              for n in ignored))
    if warn and "epochs" in taken and taken["epochs"] != stored.epochs:
        log.info("--epochs %d: the run now ends after epoch %d (it was set to %d)", taken["epochs"],
                 taken["epochs"], stored.epochs)
    return replace(stored, **{**taken, "resume": True, "device": given.device, "data_root": given.data_root,
                              "out": out, "given": None})


def check_grid(options: TrainOptions, dataset: StoredDataset | None = None) -> None:
    """Refuse a ``--grid-size`` finer than the encoder's own grid: pooling 7×7 to 14×14 copies every cell into
    2×2 cells (4× the attention cost, no resolution). The way to a real finer grid is a larger input; say so
    when the stored images are smaller than that input (they would be upsampled)."""
    spec = ENCODERS[options.encoder]
    size = options.image_size or spec.image_size
    rows, cols = spec.grid_shape(size, size)
    if options.grid_size and options.grid_size > min(rows, cols):
        needed = options.grid_size * spec.reduction
        raise SatcliError(f"--grid-size {options.grid_size} is finer than {options.encoder}'s {rows}×{cols} grid at "
                          f"{size} px: pooling would only copy cells. For a real {options.grid_size}×"
                          f"{options.grid_size} grid give it larger images: --image-size {needed} (and preprocess "
                          f"with --image-size {needed} or more)")
    if dataset is not None and size > dataset.image_size:
        log.warning("--image-size %d is larger than the %d px images stored in %s: they are upsampled; "
                    "preprocess with --image-size %d for real detail", size, dataset.image_size, dataset.root, size)


def _prepare_out(options: TrainOptions, out: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from, if any; refuses to clobber an earlier run by accident."""
    last = out / LAST
    if options.resume:
        if not last.is_file():
            raise SatcliError(f"nothing to resume: no {LAST} here (start without --resume)", out)
        return read_checkpoint(last)
    if last.is_file() and not options.overwrite:
        raise SatcliError("already holds a training run; pass --resume to continue it, --overwrite to start "
                          "again, or --out for a new run", out)
    if options.overwrite:
        for name in (LAST, BEST, METRICS, STEPS):
            (out / name).unlink(missing_ok=True)
    return None


_TRAIN_STATE = ("optimizer", "scheduler", "rng", "epoch", "best_bleu4", "epochs_since_improvement", "history",
                "options")
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "Path": (str,)}


def resume_options(checkpoint: dict[str, Any], path: Path) -> TrainOptions:
    """The options a run was started with, from the training state of its ``last.pt``; a one-line error when
    that state is missing (a ``best.pt`` copied over it) or its options are malformed."""
    state = checkpoint.get("train_state")
    if not isinstance(state, dict) or any(key not in state for key in _TRAIN_STATE):
        raise SatcliError("holds no training state to resume from (is it a copy of best.pt?); start a new run "
                          "without --resume", path)
    values = state["options"]
    if not isinstance(values, dict):
        raise SatcliError("holds malformed train options (not a mapping)", path)
    for option in fields(TrainOptions):
        if option.name not in values:
            continue
        value, kinds = values[option.name], str(option.type).split(" | ")
        allowed = tuple(t for kind in kinds for t in _TYPES.get(kind, ()))
        if (value is None and "None" in kinds) or (isinstance(value, allowed)
                                                    and (bool not in allowed) == (not isinstance(value, bool))):
            continue
        raise SatcliError(f"holds malformed train options: {option.name} should be {option.type}", path)
    if not isinstance(values.get("dataset"), str):
        raise SatcliError("holds malformed train options: no dataset name", path)
    return TrainOptions.from_dict(values)


def check_resume_vocabulary(checkpoint: dict[str, Any], vocab: Vocabulary, dataset: str, path: Path) -> None:
    """Refuse to resume on a dataset whose vocabulary differs from the checkpoint's: the word ids would mean
    other words (a store preprocessed again, with other options or captions)."""
    if list(checkpoint["vocab"]) != vocab.to_list():
        raise SatcliError(f"its vocabulary ({len(checkpoint['vocab'])} words) is not the one of dataset {dataset!r} "
                          f"({len(vocab)} words): the dataset was preprocessed again; resume with the dataset it "
                          "was trained on, or start a new run", path)


def run(options: TrainOptions) -> TrainResult:
    """Train as ``options`` say; return where the checkpoints are and how well the best one did."""
    ranks = Ranks.from_env()
    if ranks.world > 1 and not dist.is_initialized():
        backend = "nccl" if options.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    try:
        if options.scst or _resumes_scst(options):
            from satcli.scst import run_scst

            return run_scst(options, ranks)
        return _run(options, ranks)
    finally:
        if ranks.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _resumes_scst(options: TrainOptions) -> bool:
    """``--resume`` of a run folder that holds an SCST run continues it as SCST, flag or not."""
    last = Path(options.out or Path("runs") / options.dataset) / LAST
    if not options.resume or not last.is_file():
        return False
    state = read_checkpoint(last).get("train_state")
    stored = state.get("options") if isinstance(state, dict) else None
    return isinstance(stored, dict) and stored.get("scst") is True


def _run(options: TrainOptions, ranks: Ranks) -> TrainResult:
    out = Path(options.out or Path("runs") / options.dataset)
    resume_from = _prepare_out(options, out) if ranks.main else None
    _barrier(ranks)
    if ranks.world > 1 and not ranks.main and options.resume:
        resume_from = read_checkpoint(out / LAST)
    if resume_from is not None:
        stored = resume_options(resume_from, out / LAST)
        options = resumed_options(stored, options, out, warn=ranks.main)
    if options.encoder not in ENCODERS:
        raise SatcliError(f"unknown encoder {options.encoder!r}; choose one of {', '.join(ENCODERS)}")
    device = resolve_device(options.device)
    if options.tensorboard:
        require_tensorboard()  # before the long feature caching, not after
    torch.manual_seed(options.seed + ranks.rank)
    random.seed(options.seed)

    dataset = StoredDataset.open(options.data_root, options.dataset)
    vocab = dataset.vocab
    if resume_from is not None:
        check_resume_vocabulary(resume_from, vocab, options.dataset, out / LAST)
    val_split = "val" if "val" in dataset.splits else "test"
    check_grid(options, dataset)
    try:
        model = Captioner(options.model_config(len(vocab)),
                          pretrained_encoder=options.pretrained and resume_from is None)
    except PretrainedWeightsUnavailable as error:
        raise SatcliError(str(error)) from None
    if resume_from is not None:
        model.load_state_dict(resume_from["state_dict"])
    model.to(device)
    preprocessing = DataConfig.for_config(model.config)
    table = CaptionTable.from_store(dataset, "train")

    decoder_params = list(model.decoder.parameters())
    optimizer = torch.optim.Adam([{"params": decoder_params, "lr": options.decoder_lr, "name": "decoder"}])
    if options.fine_tune_encoder:
        model.encoder.set_fine_tuning(options.fine_tune_blocks)
        optimizer.add_param_group({"params": [p for p in model.encoder.parameters() if p.requires_grad],
                                   "lr": options.encoder_lr, "name": "encoder"})
        model.encoder.set_fine_tuning(0)  # frozen until fine_tune_after
    scheduler = plateau_scheduler(optimizer, options)
    start_epoch, best_bleu, since_best, history = 0, -1.0, 0, []
    if resume_from is not None:
        state = resume_from["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(_own_rng_state(state, ranks), device)
        start_epoch, best_bleu = state["epoch"] + 1, state["best_bleu4"]
        since_best, history = state["epochs_since_improvement"], list(state["history"])
        if ranks.main:
            log.info("resuming %s at epoch %d", out, start_epoch + 1)
            _write_metrics(out, history)

    use_amp = options.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if resume_from is not None and resume_from["train_state"].get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(resume_from["train_state"]["scaler"])
    train_model: torch.nn.Module = model
    if options.compile:
        model.decoder.step = torch.compile(model.decoder.step, dynamic=True)  # type: ignore[method-assign]
    stepper = Stepper(model, train_model, optimizer, scaler, options, ranks, device, amp_dtype if use_amp else None)
    wrapped_tuning: bool | None = None  # whether the DDP wrapper was built with the encoder trainable

    needs_cache = not options.fine_tune_encoder or options.fine_tune_after > start_epoch
    train_features = val_features = None
    if ranks.main and needs_cache:
        train_features = cached_features(dataset, "train", model, device)
        val_features = cached_features(dataset, val_split, model, device)
    _barrier(ranks)
    if not ranks.main and needs_cache:
        train_features = cached_features(dataset, "train", model, device)
    flip = _flip_table(vocab)

    progress = None
    last_path, best_path = out / LAST, out / BEST
    epoch = start_epoch - 1
    steps = StepLog(out, keep_epochs=start_epoch, tensorboard=options.tensorboard) if ranks.main else None
    try:
        for epoch in range(start_epoch, options.epochs):
            if since_best >= options.patience:
                log.info("stopping early: no validation improvement for %d epochs", since_best)
                break
            tuning = options.fine_tune_encoder and epoch >= options.fine_tune_after
            model.encoder.set_fine_tuning(options.fine_tune_blocks if tuning else 0)
            if ranks.world > 1 and tuning != wrapped_tuning:
                # DDP all-reduces only the parameters trainable when it is built: rebuild it once the encoder
                # trains, or every rank's encoder would drift apart (rank 0 saving one tuned on 1/world of the data)
                stepper.train_model, wrapped_tuning = _distributed(model, device), tuning
            model.train()
            plan = batch_plan(table.lengths, options.batch_size, options.seed, epoch)
            progress = make_progress(TextColumn("loss {task.fields[loss]:.3f}")) if ranks.main else None
            if progress:
                progress.start()
                task = progress.add_task(f"epoch {epoch + 1}/{options.epochs}", total=len(plan), unit="steps",
                                         loss=float("nan"))
            batches: Iterator[Any]
            if tuning:
                batches = _image_batches(dataset, table, plan, ranks, preprocessing, flip, options.seed, epoch)
            else:
                flips = FeatureFlips.for_epoch(model.grid_shape, flip, len(table), options.seed, epoch) \
                    if options.feature_flips else None
                shifts = FeatureShifts.for_epoch(model.grid_shape, len(table), options.seed, epoch) \
                    if options.feature_shifts else None
                batches = _feature_batches(train_features, table, plan, ranks, flips, shifts)
            started, n_samples, n_tokens, n_steps = time.perf_counter(), 0, 0, 0
            loss_sum = torch.zeros((), device=device)
            for batch in _prefetch(batches):
                if tuning:
                    images, per_caption, tokens, lengths, global_n, global_tokens = batch
                    loss = stepper(None, tokens, lengths, global_n, global_tokens, images, per_caption)
                else:
                    features, tokens, lengths, global_n, global_tokens = batch
                    loss = stepper(features, tokens, lengths, global_n, global_tokens)
                n_steps += 1
                n_samples += global_n
                n_tokens += global_tokens
                loss_sum += loss
                if steps:
                    steps.step(epoch + 1, epoch * len(plan) + n_steps, loss * ranks.world,
                               {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)})
                if progress:
                    progress.advance(task)
                    if n_steps % 20 == 0:  # reading the loss waits for the device: only now and then
                        progress.update(task, loss=float(loss_sum) / n_steps)
            if ranks.world > 1:
                dist.all_reduce(loss_sum)  # each rank returned its share of every global batch's loss
            loss_sum = float(loss_sum)
            seconds = time.perf_counter() - started
            if progress:
                progress.stop()

            scores = None
            if ranks.main:
                scores = validate(model, dataset, val_split, vocab, device, None if tuning else val_features,
                                  options.val_beam_size, options.val_max_length)
            scores = _broadcast(scores, ranks)
            improved = scores["bleu4"] > best_bleu
            best_bleu, since_best = (scores["bleu4"], 0) if improved else (best_bleu, since_best + 1)
            scheduler.step(scores["bleu4"])
            line = {"epoch": epoch + 1, "loss": loss_sum / max(n_steps, 1),
                    **{f"val_{k}": v for k, v in scores.items()},
                    "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
                    "samples_per_s": n_samples / seconds, "tokens_per_s": n_tokens / seconds,
                    "seconds": seconds, "encoder_tuning": tuning, "ranks": ranks.world}
            history.append(line)
            rng_ranks = _gather(_rng_state(device), ranks)  # every rank's own stream, for --resume
            if ranks.main:
                metrics = {"epoch": epoch + 1, "val_split": val_split, **{f"val_{k}": v for k, v in scores.items()}}
                if improved:
                    save_checkpoint(best_path, model, vocab, options.to_dict(), metrics)
                state = {"options": options.to_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_ranks[0], "rng_ranks": rng_ranks,
                         "scaler": scaler.state_dict(), "epoch": epoch,
                         "best_bleu4": best_bleu, "epochs_since_improvement": since_best, "history": history}
                save_checkpoint(last_path, model, vocab, options.to_dict(), metrics, train_state=state)
                _write_metrics(out, history)
                steps.epoch(epoch + 1, (epoch + 1) * len(plan), {k: v for k, v in line.items() if k.startswith("val_")})
                console.print(f"epoch {epoch + 1}: loss {line['loss']:.3f}  val BLEU-4 {100 * scores['bleu4']:.1f}"
                              f"{'  (best)' if improved else ''}  {line['samples_per_s']:.0f} captions/s")
            _barrier(ranks)
    finally:
        if progress:
            progress.stop()
        if steps:
            steps.close()

    if ranks.main:
        _summary(out, history, best_bleu)
        _remember(best_path if best_path.is_file() else last_path)
    return TrainResult(out, best_path, last_path, epoch + 1, best_bleu, history)


def _remember(path: Path) -> None:
    """The finished run becomes the default model of ``satcli caption``."""
    try:
        from satcli.defaults import remember_model
    except ImportError:  # pragma: no cover - the caption side is optional in a partial install
        return
    remember_model(path)


def _summary(out: Path, history: list[dict[str, Any]], best_bleu: float) -> None:
    table = Table(title=f"Training run {out}")
    for column in ("epoch", "loss", "val BLEU-4 (0–100)", "captions/s", "seconds"):
        table.add_column(column, justify="right")
    for line in history:
        table.add_row(str(line["epoch"]), f"{line['loss']:.3f}", f"{100 * line['val_bleu4']:.1f}",
                      f"{line['samples_per_s']:.0f}", f"{line['seconds']:.0f}")
    console.print(table)
    console.print(f"best validation BLEU-4 {100 * max(best_bleu, 0):.1f}; checkpoints in {out}")
