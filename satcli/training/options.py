"""What steers a training run and what it returns: :class:`TrainOptions`, :class:`TrainResult`, and the checks
that keep ``--resume`` honest (the stored options, the vocabulary, the grid)."""

from __future__ import annotations

import logging
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rich.table import Table

from models.captioner import CaptionerConfig
from models.encoders import DEFAULT_ENCODER, ENCODERS
from satcli.core.console import shown
from satcli.core.errors import SatcliError
from satcli.data.store import StoredDataset
from satcli.data.vocab import Vocabulary

log = logging.getLogger(__name__)


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
    feature_dropout: float = 0.0  # drop each feature channel of a picture (all its cells alike) in training
    words_loss: float = 0.0  # λ of the bag-of-words head's loss; > 0 adds the head, which starts the LSTM
    unlikelihood: float = 0.0  # α of the token-level unlikelihood loss on the caption's earlier words
    coverage: bool = False  # the attention reads how much each cell was attended so far
    coverage_loss: float = 0.0  # λ of See et al.'s coverage loss Σ_t Σ_i min(α_ti, Σ_{t'<t} α_t'i)
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
    # with fine-tuning: the top N blocks (-1: all, stem included). 6: on efficientnet-lite0 its stride-32 stages and
    # head, on the default -stage6 the four blocks of stage 6 and the last two of stage 5; the low blocks keep their
    # generic ImageNet filters, as the reference code keeps ResNet's stem and layer1
    fine_tune_blocks: int = 6
    feature_flips: bool = False  # frozen encoder: half the captions read the mirrored picture's cached features,
    # with left/right swapped in their words
    feature_shifts: bool = False  # frozen encoder: move cached feature grids by up to a cell (a small crop)
    feature_views: int = 0  # frozen encoder: also cache this many augmented views of train (satcli.data.views)
    val_beam_size: int = 1
    val_max_length: int = 30
    # self-critical fine-tuning (satcli.training.scst): CIDEr-D reward, greedy baseline
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
        """The options the user gave (of the command line's parameters, those that are options here)."""
        if self.given is not None:
            return set(self.given) & {f.name for f in fields(self)}
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
            feature_dropout=self.feature_dropout, words_loss=self.words_loss, coverage=self.coverage,
            deep_output=self.deep_output, doubly_stochastic=self.doubly_stochastic)


@dataclass
class TrainResult:
    out: Path
    best: Path
    last: Path
    epochs: int
    best_bleu4: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_cider_d: float | None = None  # SCST runs: the validation CIDEr-D that picked best.pt

    def table(self) -> Table:
        """Every epoch of the run, one row each (scores on the 0–100 scale)."""
        if self.best_cider_d is not None:
            table = Table(title=f"SCST run {shown(self.out)}")
            columns = {"epoch": ("epoch", "d"), "sample reward": ("sample_reward", ".3f"),
                       "greedy reward": ("greedy_reward", ".3f"), "val CIDEr-D (0–100)": ("val_cider_d", "%"),
                       "val BLEU-4": ("val_bleu4", "%"), "seconds": ("seconds", ".0f")}
        else:
            table = Table(title=f"Training run {shown(self.out)}")
            columns = {"epoch": ("epoch", "d"), "loss": ("loss", ".3f"), "val BLEU-4 (0–100)": ("val_bleu4", "%"),
                       "captions/s": ("samples_per_s", ".0f"), "seconds": ("seconds", ".0f")}
        for column in columns:
            table.add_column(column, justify="right")
        for line in self.history:
            table.add_row(*(_cell(line.get(key), style) for key, style in columns.values()))
        return table

    def closing_line(self) -> str:
        """The best validation score and where the checkpoints are."""
        if self.best_cider_d is not None:
            return f"best validation CIDEr-D {100 * max(self.best_cider_d, 0):.1f}; checkpoints in {shown(self.out)}"
        return f"best validation BLEU-4 {100 * max(self.best_bleu4, 0):.1f}; checkpoints in {shown(self.out)}"


def _cell(value: Any, style: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if style == "%" else format(value, style)


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


TRAIN_STATE = ("optimizer", "scheduler", "rng", "epoch", "best_bleu4", "epochs_since_improvement", "history",
                "options")
OPTION_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "Path": (str,)}


def resume_options(checkpoint: dict[str, Any], path: Path) -> TrainOptions:
    """The options a run was started with, from the training state of its ``last.pt``; a one-line error when
    that state is missing (a ``best.pt`` copied over it) or its options are malformed."""
    state = checkpoint.get("train_state")
    if not isinstance(state, dict) or any(key not in state for key in TRAIN_STATE):
        raise SatcliError("holds no training state to resume from (is it a copy of best.pt?); start a new run "
                          "without --resume", path)
    values = state["options"]
    if not isinstance(values, dict):
        raise SatcliError("holds malformed train options (not a mapping)", path)
    for option in fields(TrainOptions):
        if option.name not in values:
            continue
        value, kinds = values[option.name], str(option.type).split(" | ")
        allowed = tuple(t for kind in kinds for t in OPTION_TYPES.get(kind, ()))
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
