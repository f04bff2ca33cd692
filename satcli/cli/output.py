"""What the ``satcli`` commands print: captions and JSON lines on stdout, summaries and notes on stderr."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from satcli.core.console import console as human
from satcli.core.console import counted, shown, visible

if TYPE_CHECKING:
    from pathlib import Path

    from satcli.captioning.plan import CaptionPlan
    from satcli.formats.model_info import ModelInfo
    from satcli.pictures.overlays import OverlaySummary
    from satcli.pictures.report import ReportSummary
    from satcli.scoring.evaluate import EvaluateResult
    from satcli.training import TrainResult
    from satcli.training.plan import TrainPlan

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
            human.print(f"{shown(record['path'])}: [yellow]{shown(record['error'])}[/]", highlight=False,
                        soft_wrap=True)
        elif n_images == 1:
            typer.echo(visible(record["caption"]))
        else:
            typer.echo(visible(f"{record['path']} → {record['caption']}"))


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
    human.print(f"attention pictures: {summary.n_written:,} in {shown(summary.directory)}", highlight=False)
    if summary.n_missing_images:
        human.print(f"[yellow]{counted(summary.n_missing_images, 'image')} not found[/] (drawn grey)", highlight=False)


def print_evaluated(result: EvaluateResult, what: str, as_json: bool) -> None:
    """The scores of ``what`` (``dataset/split``) on stderr, where report.json and the predictions are; with
    ``--json``, report.json's content on stdout."""
    if as_json:
        typer.echo(json.dumps(json.loads(result.report.read_text(encoding="utf-8")), ensure_ascii=False))
    human.print(result.table(f"{shown(what)}, {result.n_images} images (scores 0–100)"))
    for name, why in result.skipped.items():
        human.print(f"[yellow]{name.upper()} skipped:[/] {shown(why)}", highlight=False)
    human.print(f"report:      {shown(result.report)}", highlight=False)
    for beam in result.beams:
        human.print(f"predictions: {shown(beam.predictions)}", highlight=False)


def print_reported(summary: ReportSummary) -> None:
    """Where the HTML report went, how many images and errors it shows, and images that were not found."""
    human.print(f"report: {shown(summary.output)} ({counted(summary.n_rows, 'image')}, "
                f"{counted(summary.n_errors, 'error')})")
    if summary.n_total > summary.n_rows:
        human.print(f"{summary.n_rows:,} of {summary.n_total:,} rows shown (--limit)")
    if summary.n_missing_images:
        human.print(f"[yellow]{counted(summary.n_missing_images, 'image')} not found[/]: pass --image-root")


def print_info(info: ModelInfo, as_json: bool) -> None:
    """``satcli info``: the checkpoint's description as a table (stdout), or one JSON object with --json."""
    from rich.table import Table

    from satcli.core.console import out_console

    if as_json:
        typer.echo(json.dumps(info.to_dict(), ensure_ascii=False, default=str))
        return
    table = Table(title=shown(info.path), show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    pre = info.preprocessing
    rows = {
        "encoder": f"{info.encoder} ({info.feature_dim} channels)",
        "input": f"{info.image_size}×{info.image_size} px, {pre.get('interpolation')} resize, mean {pre.get('mean')}, "
                 f"std {pre.get('std')}",
        "grid": f"{info.grid[0]}×{info.grid[1]} cells",
        "attention": info.attention,
        "decoder": f"embedding {info.embed_dim}, attention {info.attention_dim}, LSTM {info.decoder_dim}",
        "vocabulary": f"{info.vocab_size:,} words",
        "parameters": f"{info.n_parameters:,}",
        "dataset": str(info.dataset),
        "best epoch": str(info.metrics.get("epoch", "–")),
        **{f"val {name}": f"{100 * value:.1f}" for name, value in info.best_scores().items()},
        "training options": ", ".join(f"{k}={v}" for k, v in sorted(info.train_options.items())) or "–",
        "sha256": info.sha256,
        "size": f"{info.n_bytes / 1e6:.1f} MB",
        "written by": f"satcli {info.satcli_version} (checkpoint format {info.format_version}; this is satcli "
                      f"{info.reading_satcli_version})",
    }
    for name, value in rows.items():
        table.add_row(name, shown(value))
    out_console.print(table)


def print_plan(plan: TrainPlan | CaptionPlan, as_json: bool) -> None:
    """``train``/``caption --dry-run``: the plan's lines on stderr, or one JSON object on stdout with --json."""
    if as_json:
        typer.echo(json.dumps(plan.to_dict()))
        return
    for line in plan.lines():
        human.print(shown(line), highlight=False, soft_wrap=True)
