"""The command-line options of ``satcli``, declared once as ``Annotated`` aliases: those several commands share,
and the longest of train's own (kept here so its signature reads at a glance)."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from satcli.core.console import set_quiet

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


# Options shared by the commands that caption images (caption now; evaluate reuses them), declared once.
ModelOption = Annotated[Path | None, typer.Option(
    "--model", "-m", dir_okay=False, show_default=False,
    help="Model checkpoint. Default: $SATCLI_MODEL, else the model of the most recent `satcli train`.")]
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
OverlaysOption = Annotated[Path | None, typer.Option(
    "--overlays", file_okay=False, show_default=False,
    help="Also draw where the model looked: a PNG (a panel per word) and a GIF per image, in this folder.")]

# train's frozen-encoder augmentations: one command's options, declared here to keep train's signature readable.
FeatureFlipsOption = Annotated[bool, typer.Option(
    "--feature-flips", help="Frozen encoder: mirror half the cached feature grids left-right each epoch, "
    "swapping the words left/right with them.")]
FeatureShiftsOption = Annotated[bool, typer.Option(
    "--feature-shifts", help="Frozen encoder: move the cached feature grids by up to one cell each epoch "
    "(what a small crop does).")]
FeatureViewsOption = Annotated[int, typer.Option(
    min=0, help="Frozen encoder: also encode this many augmented views of the training pictures (turned up to "
    "25°, zoomed, relit; cached) and let each caption read a random one each epoch.")]
