"""The ``satcli`` command line. Commands stay thin: arguments → an options dataclass → ``<step>.run(options)``.

User mistakes arrive here as :class:`~satcli.errors.SatcliError` and leave as one red line and exit code 1;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from satcli import __version__
from satcli.errors import SatcliError

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("satcli")

# Options shared by several commands, declared once.
DataRootOption = Annotated[
    Path,
    typer.Option("--data-root", envvar="SATCLI_DATA", help="Where preprocessed datasets live.", show_default=True),
]


class _Group(typer.core.TyperGroup):
    """Turns SatcliError into one red line and exit code 1, for the real CLI and for CliRunner alike."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SatcliError as error:
            if (ctx.obj or {}).get("verbose"):
                err_console.print_exception()
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="satcli",
    help="Batch image captioning with Show, Attend and Tell: train, evaluate, caption, and see where it looked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"satcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=verbose, show_time=False)],
        force=True,
    )


@app.command()
def encoders() -> None:
    """List the image encoders, their input size, feature grid and where their weights come from."""
    from models.encoders import ENCODERS

    table = Table(title="Encoders")
    for column in ("name", "input", "grid", "dim", "pretrained weights"):
        table.add_column(column)
    for name, spec in ENCODERS.items():
        grid = spec.grid_shape(spec.image_size, spec.image_size)
        table.add_row(name, f"{spec.image_size}px", f"{grid[0]}×{grid[1]}", str(spec.dim), spec.weights_source)
    console.print(table)


def main() -> None:
    app()
