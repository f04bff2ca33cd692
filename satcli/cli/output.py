"""What the ``satcli`` commands print: captions and JSON lines on stdout, summaries and notes on stderr."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from satcli.core.console import console as human
from satcli.core.console import counted

if TYPE_CHECKING:
    from pathlib import Path

    from satcli.pictures.overlays import OverlaySummary
    from satcli.pictures.report import ReportSummary
    from satcli.scoring.evaluate import EvaluateResult
    from satcli.training import TrainResult

FEW_IMAGES = 20  # caption prints `path → caption` lines up to this many images, the summary alone above it


def print_captions(results: Path, n_images: int, as_json: bool, paths: frozenset[str] | None = None) -> None:
    """stdout: a JSON line per image (--json), the caption alone (one image), `path → caption` lines (a few);
    failed images are named on stderr. ``paths``: only these rows (None: every row of ``results``)."""
    from satcli.core.printing import result_records

    if n_images == 0 or (not as_json and n_images > FEW_IMAGES):
        return
    for record in result_records(results):
        if paths is not None and record["path"] not in paths:
            continue
        if as_json:
            typer.echo(json.dumps(record, ensure_ascii=False))
        elif record["error"] is not None:
            human.print(f"{escape(record['path'])}: [yellow]{escape(record['error'])}[/]", highlight=False,
                        soft_wrap=True)
        elif n_images == 1:
            typer.echo(record["caption"])
        else:
            typer.echo(f"{record['path']} → {record['caption']}")


def print_trained(result: TrainResult, as_json: bool) -> None:
    """The run's epochs and best score on stderr; with ``--json``, the result on stdout."""
    human.print(result.table())
    human.print(result.closing_line())
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "best": str(result.best), "last": str(result.last),
                               "epochs": result.epochs, "best_val_bleu4": result.best_bleu4,
                               "history": result.history}, ensure_ascii=False))


def print_drawn(summary: OverlaySummary) -> None:
    """How many attention pictures were drawn, and where; images that were not found."""
    human.print(f"attention pictures: {summary.n_written:,} in {summary.directory}")
    if summary.n_missing_images:
        human.print(f"[yellow]{counted(summary.n_missing_images, 'image')} not found[/] (drawn grey)", highlight=False)


def print_evaluated(result: EvaluateResult, what: str, as_json: bool) -> None:
    """The scores of ``what`` (``dataset/split``) on stderr, where report.json and the predictions are; with
    ``--json``, report.json's content on stdout."""
    if as_json:
        typer.echo(json.dumps(json.loads(result.report.read_text(encoding="utf-8")), ensure_ascii=False))
    human.print(result.table(f"{what}, {result.n_images} images (scores 0–100)"))
    for name, why in result.skipped.items():
        human.print(f"[yellow]{name.upper()} skipped:[/] {why}", highlight=False)
    human.print(f"report:      {result.report}")
    for beam in result.beams:
        human.print(f"predictions: {beam.predictions}")


def print_reported(summary: ReportSummary) -> None:
    """Where the HTML report went, how many images and errors it shows, and images that were not found."""
    human.print(f"report: {summary.output} ({counted(summary.n_rows, 'image')}, {counted(summary.n_errors, 'error')})")
    if summary.n_missing_images:
        human.print(f"[yellow]{counted(summary.n_missing_images, 'image')} not found[/]: pass --image-root")
