"""The command-line options of ``satcli``, declared once as ``Annotated`` aliases: those several commands share,
and the longest of train's own (kept here so its signature reads at a glance)."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from satcli.cli.config import config_callback
from satcli.core.console import set_quiet
from satcli.core.errors import SatcliError

# Options shared by several commands, declared once.
DataRootOption = Annotated[
    Path,
    typer.Option("--data-root", envvar="SATCLI_DATA", help="Where preprocessed datasets live.", show_default=True),
]


def _quiet(value: bool) -> None:
    if value:
        set_quiet(True)
        logging.getLogger().setLevel(logging.WARNING)


# -q is accepted before the command (`satcli -q caption ...`) and after it (`satcli caption ... -q`).
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", callback=_quiet, expose_value=False, is_eager=True,  # eager: before --threads logs
    help="Only results, warnings and errors: no progress, tables or notes.")]


def _threads(ctx: typer.Context, value: int | None) -> int | None:
    # applied while the command line is read: before the command imports torch, so the wait policy still works
    if not ctx.resilient_parsing:
        from satcli.core.threads import configure_threads

        configure_threads(value)
    return value


# train, caption, evaluate and demo: torch's CPU threads (satcli.core.threads has the rules).
ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", min=1, callback=_threads, expose_value=False, show_default=False,
    help="Torch CPU threads. Default: $SATCLI_THREADS, else $OMP_NUM_THREADS, else the CPUs this process may "
    "use less those other work keeps busy (then waiting threads sleep instead of spinning).")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Machine-readable results on stdout (human text stays on stderr).")]


class Attention(str, Enum):
    """Attention kinds of the captioner."""

    soft = "soft"
    hard = "hard"


class CocoReferences(str, Enum):
    """How ``evaluate --coco`` treats the references (satcli.scoring.evaluate.COCO_REFERENCES)."""

    official = "official"
    vocabulary = "vocabulary"


# Options shared by the commands that caption images (caption now; evaluate reuses them), declared once.
def resolve_model(path: Path | None) -> Path | None:
    """A run folder given as the model means the checkpoint in it: best.pt, else last.pt."""
    if path is None or not path.is_dir():
        return path
    for name in ("best.pt", "last.pt"):
        if (path / name).is_file():
            return path / name
    raise SatcliError("a folder with no best.pt or last.pt in it (give a checkpoint file or a run folder)", path)


ModelOption = Annotated[Path | None, typer.Option(
    "--model", "-m", show_default=False, callback=resolve_model,
    help="Model checkpoint, or a run folder (its best.pt). Default: $SATCLI_MODEL, else the model of the most "
         "recent `satcli train`.")]
BeamSizeOption = Annotated[int, typer.Option("--beam-size", min=1, help="Captions kept per step (1: greedy).")]
MaxLengthOption = Annotated[int, typer.Option("--max-length", min=1, help="Most words per caption, <end> included.")]
LengthPenaltyOption = Annotated[float, typer.Option(
    "--length-penalty", min=0.0, help="Rank captions by sum of log-probabilities / length ** this (0: no penalty).")]
NBestOption = Annotated[int, typer.Option(
    "--n-best", min=1, help="Captions kept per image, best first (at most --beam-size); the runners-up go to the "
    "results' `alternatives` column.")]
NoRepeatNgramOption = Annotated[int, typer.Option(
    "--no-repeat-ngram", min=0, help="Never write the same N words twice in one caption (0: off).")]
MinLengthOption = Annotated[int, typer.Option("--min-length", min=0, help="Fewest words before a caption may end.")]
AllowUnkOption = Annotated[bool, typer.Option(
    "--allow-unk", help="Let captions contain <unk> (the out-of-vocabulary token; never written by default).")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch on the device.")]
DeviceOption = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda|cuda:N|mps", help="auto: a CUDA GPU when there is one, else the CPU.")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=0, show_default=False,
    help="Processes decoding images (0: in the main one). Default: min(4, CPUs); on a GPU up to 8, one CPU left free.")]
ResultsOption = Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="Results Parquet file.")]
CaptionOutputOption = Annotated[str, typer.Option("--output", "-o", help=(
    "Results Parquet file. With tar/Parquet shards as inputs: a folder, local or a URL (s3://...), for one results "
    "file per shard."))]
ExcludeOption = Annotated[list[str] | None, typer.Option(
    "--exclude", metavar="GLOB", show_default=False, help="Leave out files matching this pattern (repeatable).")]
StorageOption = Annotated[list[str] | None, typer.Option(
    "--storage-option", metavar="KEY=VALUE", show_default=False,
    help="For URLs: an fsspec option such as endpoint_url=http://host:9000 (repeatable).")]
ColumnOption = Annotated[str | None, typer.Option(
    "--column", show_default=False, help="Parquet inputs: the column of image bytes or paths/URLs (default: jpg, "
    "image, ...).")]
SkipExistingOption = Annotated[bool, typer.Option(
    "--skip-existing", help="Shards: skip samples whose key is already in a results file of the output folder.")]

EngineOption = Annotated[str, typer.Option(
    "--engine", metavar="local|ray", help="ray: tar/Parquet shards captioned by Ray Data actors (one model each), "
    "Ray placing and retrying them (docs/scale.md). Needs satcli[ray].")]
AddressOption = Annotated[str | None, typer.Option(
    "--address", show_default=False, help="--engine ray: the cluster (auto, ray://host:10001). Default: the one "
    "this process joined, else a local one.")]
ActorsOption = Annotated[int | None, typer.Option(
    "--actors", min=1, show_default=False, help="--engine ray: how many actors. Default: one per GPU, else one "
    "per CPU.")]


def caption_output(text: str) -> Path | str:
    """caption's ``-o``: a local path, or a URL kept as text (a Path would fold its ``//``)."""
    from satcli.captioning.sources.remote import is_url

    return text if is_url(text) else Path(text)


def storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--storage-option key=value`` arguments → fsspec keyword arguments."""
    from satcli.captioning.sources.remote import parse_storage_options

    return parse_storage_options(pairs or ())
OverlaysOption = Annotated[Path | None, typer.Option(
    "--overlays", file_okay=False, show_default=False,
    help="Also draw where the model looked: a PNG (a panel per word) and a GIF per image, in this folder.")]

# train's frozen-encoder augmentations: one command's options, declared here to keep train's signature readable.
FeatureFlipsOption = Annotated[bool, typer.Option(
    "--feature-flips", help="Frozen encoder: half the captions each epoch read the features of their picture "
    "mirrored left-right (cached once, as a view), with the words left/right swapped.")]
FeatureShiftsOption = Annotated[bool, typer.Option(
    "--feature-shifts", help="Frozen encoder: move the cached feature grids by up to one cell each epoch "
    "(what a small crop does).")]
FeatureViewsOption = Annotated[int, typer.Option(
    min=0, help="Frozen encoder: also encode this many augmented views of the training pictures (turned up to "
    "25°, zoomed, relit; cached) and let each caption read a random one each epoch.")]


# train's run-file switches: read options from TOML, write them as TOML, or only check and plan
ConfigOption = Annotated[Path | None, typer.Option(
    "--config", exists=True, dir_okay=False, is_eager=True, callback=config_callback, show_default=False,
    help="Read options from this TOML file (options on the command line win); --print-config writes one.")]
PrintConfigOption = Annotated[bool, typer.Option(
    "--print-config", help="Print these options as a TOML file for --config, and exit.")]
DryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Check the dataset and options, say what the run would do (steps, feature cache, run "
    "folder), and exit without training.")]
CaptionDryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Check the inputs, model and output, say what the run would do (images found, files skipped "
    "by extension, output, what it would resume), and exit without captioning.")]
