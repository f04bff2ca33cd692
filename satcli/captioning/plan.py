"""``satcli caption --dry-run``: what a caption run would do, checked as the run checks it, without captioning or
writing anything: the images found (and the files skipped by extension or ``--exclude``), the input shards, the
output, the model, and what a rerun would resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from satcli.captioning.fingerprint import load_run_model
from satcli.captioning.options import CaptionOptions, check_options, check_single_output, decoding_options
from satcli.captioning.pipeline import previous_output
from satcli.captioning.shards import part_path, resolve_shard
from satcli.captioning.sources import find_inputs
from satcli.captioning.state import RunState
from satcli.core.console import counted
from satcli.core.device import resolve_device
from satcli.formats.results import read_column


@dataclass
class CaptionPlan:
    """What ``satcli caption`` would do (``to_dict`` is ``--dry-run --json``)."""

    n_images: int  # loose images this run (this shard) takes; 0 for shard inputs
    n_shards: int  # input shards this run takes
    skipped: dict[str, int] = field(default_factory=dict)  # files left out by extension, by extension
    n_excluded: int = 0  # files an --exclude pattern left out
    output: str = ""
    model: str = ""
    device: str = ""
    n_done: int = 0  # images (or shards) already in the output or an unfinished run's chunks
    resume: str = "new output"  # what the output's state means for the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan as lines for people."""
        what = counted(self.n_shards, "input shard") if self.n_shards else counted(self.n_images, "image")
        skipped = ", ".join(f"{n:,} {ext or '(no extension)'}" for ext, n in sorted(self.skipped.items()))
        lines = [f"inputs:  {what}" + (f"; skipped by extension: {skipped}" if skipped else "")
                 + (f"; excluded: {self.n_excluded:,}" if self.n_excluded else "")]
        lines += [f"model:   {self.model} on {self.device}", f"output:  {self.output} ({self.resume})"]
        return lines


def plan_caption(options: CaptionOptions) -> CaptionPlan:
    """Check ``options`` as the run does (inputs, output, model, an earlier output's model and options) and say
    what it would do. Nothing is locked, captioned or written."""
    check_options(options)
    decoding = decoding_options(options)
    shard = resolve_shard(options.shard)
    found = find_inputs(options.inputs, options.root, options.exclude, options.storage_options, options.column)
    loaded, model_path, run_fingerprint = load_run_model(options.model, decoding, options.max_pixels)
    plan = CaptionPlan(0, 0, dict(found.skipped), found.n_excluded, model=str(model_path),
                       device=str(resolve_device(options.device)))
    if found.shards:
        shards = found.shards[shard[0]::shard[1]]
        plan.n_shards, plan.output = len(shards), str(options.output)
        existing = _existing_names(options.output)
        plan.n_done = sum(s.output_name in existing for s in shards)
        plan.resume = (f"{plan.n_done:,} of {counted(len(shards), 'shard')} have a results file: the rerun checks "
                       "and skips the complete ones" if plan.n_done else "new output folder")
        return plan
    output = part_path(check_single_output(options.output), *shard)
    keep = {s.path for s in found.images[shard[0]::shard[1]]}
    plan.n_images, plan.output = len(keep), str(output)
    done = set(previous_output(output, run_fingerprint, options.overwrite) or ()) & keep
    state = RunState(output)
    if state.directory.is_dir() and not options.overwrite:
        done |= {p for chunk in state.chunks for p in read_column(chunk, "path")} & keep
    plan.n_done = len(done)
    if options.overwrite and output.exists():
        plan.resume = "replaced (--overwrite)"
    elif done == keep and keep:
        plan.resume = "nothing to do: every image is there already"
    elif done:
        plan.resume = f"resume: {len(done):,} of {counted(len(keep), 'image')} are captioned already"
    elif output.exists():
        plan.resume = "extended: its earlier rows of other images are kept"
    return plan


def _existing_names(folder: Path | str) -> set[str]:
    path = Path(str(folder))
    if "://" in str(folder) or not path.is_dir():
        return set()  # object storage: the run itself lists what is there
    return {p.name for p in path.glob("*.parquet")}
