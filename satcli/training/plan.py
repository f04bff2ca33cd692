"""``satcli train --dry-run``: what a run would do, checked and sized, without building the network or training.

The dataset is opened (a missing store or split is the same one-line error the run would give), the options are
checked as the run checks them, and the plan says how many steps an epoch takes, how large the feature cache
is and whether it is already there, and what happens to the run folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.encoders import ENCODERS
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.data.features import cache_bytes
from satcli.data.store import StoredDataset
from satcli.training.options import TrainOptions, check_grid
from satcli.training.run import LAST, run_folder


@dataclass
class TrainPlan:
    """What ``satcli train`` would do with these options (``to_dict`` is ``--dry-run --json``)."""

    dataset: str
    out: str
    run_folder: str  # "new", "resume", "overwrite" or "refused: ..."
    device: str
    encoder: str
    grid: tuple[int, int]
    n_train_images: int
    n_train_captions: int
    val_split: str
    n_val_images: int
    epochs: int
    batch_size: int
    steps_per_epoch: int
    cache_bytes: int  # train and validation features, every view
    cache_present: bool
    fine_tune_encoder: bool

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["grid"] = list(self.grid)
        return values

    def lines(self) -> list[str]:
        """The plan as lines for people."""
        cache = "already cached" if self.cache_present else "to be computed on the first epoch"
        return [
            f"dataset:   {self.dataset}: {self.n_train_images:,} training images, {self.n_train_captions:,} "
            f"captions; validation on {self.val_split} ({self.n_val_images:,} images)",
            f"model:     {self.encoder}, a {self.grid[0]}×{self.grid[1]} grid, on {self.device}",
            f"schedule:  {self.epochs} epochs of {self.steps_per_epoch:,} steps ({self.batch_size} captions a step)",
            f"features:  {self.cache_bytes / 1e6:,.1f} MB float16 ({cache})",
            f"run:       {self.out} ({self.run_folder})",
        ]


def plan_training(options: TrainOptions) -> TrainPlan:
    """Check ``options`` against the dataset and the machine as the run would, and size the run."""
    if options.encoder not in ENCODERS:
        raise SatcliError(f"unknown encoder {options.encoder!r}; choose one of {', '.join(ENCODERS)}")
    device = resolve_device(options.device)
    dataset = StoredDataset.open(options.data_root, options.dataset)
    check_grid(options, dataset)
    val_split = "val" if "val" in dataset.splits else "test"
    spec = ENCODERS[options.encoder]
    size = options.image_size or spec.image_size
    grid = (options.grid_size, options.grid_size) if options.grid_size else spec.grid_shape(size, size)
    n_train, n_val = dataset.n_images("train"), dataset.n_images(val_split)
    n_captions = dataset.n_captions("train")
    views = 1 + options.feature_views
    out = run_folder(options, options.dataset)
    key = f"{options.encoder}-{size}px" + (f"-grid{options.grid_size}" if options.grid_size else "")
    present = any((folder / "train.npy").is_file() for folder in (dataset.root / "features").glob(f"{key}-*"))
    return TrainPlan(
        dataset=options.dataset, out=str(out), run_folder=_folder_state(options, out), device=str(device),
        encoder=options.encoder, grid=tuple(grid), n_train_images=n_train,  # type: ignore[arg-type]
        n_train_captions=n_captions, val_split=val_split, n_val_images=n_val, epochs=options.epochs,
        batch_size=options.batch_size, steps_per_epoch=math.ceil(n_captions / options.batch_size),
        cache_bytes=cache_bytes(n_train * views + n_val, grid, spec.dim), cache_present=present,
        fine_tune_encoder=options.fine_tune_encoder)


def _folder_state(options: TrainOptions, out: Path) -> str:
    has_run = (out / LAST).is_file()
    if options.resume:
        return "resume" if has_run else "refused: nothing to resume"
    if has_run:
        return "overwrite" if options.overwrite else "refused: it holds a run (--resume or --overwrite)"
    return "new"
