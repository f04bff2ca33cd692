"""The commands about models: ``satcli encoders`` (what one can be built on), ``satcli info`` (what a trained one
is) and ``satcli export`` (it, for serving without satcli). Registered on the app by :func:`register_model_commands`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from satcli.cli.options import JsonOption, QuietOption, resolve_model
from satcli.cli.output import print_info
from satcli.core.console import out_console as console
from satcli.core.console import shown


def register_model_commands(app: typer.Typer) -> None:
    app.command()(encoders)
    app.command()(info)
    app.command()(export)


def info(
    model: Annotated[Path, typer.Argument(
        help="A checkpoint (.pt) or a run folder (its best.pt).", show_default=False)],
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """What a checkpoint is: encoder, grid, vocabulary, preprocessing, training options, best validation scores,
    SHA-256 and the satcli that wrote it."""
    from satcli.commands import info as step

    print_info(step.run(resolve_model(model)), as_json)


def export(
    model: Annotated[Path, typer.Argument(
        help="A checkpoint (.pt) or a run folder (its best.pt).", show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", "-o", file_okay=False, help="Folder for the exported files.")] = Path("exported"),
    quiet: QuietOption = False,
) -> None:
    """Export for serving without satcli: safetensors weights, config.json, vocab.json, TorchScript encoder, start
    and step modules, and caption.py (a greedy captioner on them, torch and Pillow only)."""
    from satcli.commands import export as step

    result = step.run(step.ExportOptions(model=resolve_model(model), out=out))
    console.print(f"exported {shown(model)} to {shown(result.folder)}: " + ", ".join(p.name for p in result.files),
                  highlight=False, soft_wrap=True)


def encoders(quiet: QuietOption = False) -> None:
    """List the image encoders, their input size, feature grid and where their weights come from."""
    from satcli.commands import encoders as step

    table = Table(title="Encoders")
    for column in ("name", "input", "grid", "dim", "pretrained weights"):
        table.add_column(column)
    for spec in step.run():
        grid = spec.grid_shape(spec.image_size, spec.image_size)
        name = f"{spec.name} (default)" if spec.name == step.default() else spec.name
        table.add_row(name, f"{spec.image_size}px", f"{grid[0]}×{grid[1]}", str(spec.dim), spec.weights_source)
    console.print(table)
