"""``satcli report``: a results file as one HTML page (registered on the app in workflow order, after evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from satcli.cli.options import OverlaysOption, QuietOption
from satcli.cli.output import print_drawn, print_reported


def report(
    results: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, help="A results Parquet file (satcli caption or evaluate).", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False,
        help="The HTML file. Default: the results file with .html. Thumbnails go to <name>_files/ beside it.")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", file_okay=False, show_default=False,
        help="Folder the results' relative paths start from. Default: the one the file records (caption's --root, "
             "evaluate's dataset images) if it still exists, else the current one.")] = None,
    thumb_size: Annotated[int, typer.Option(
        "--thumb-size", help="Pixels a side of the images' thumbnails, at most (at least 16).")] = 224,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, show_default=False,
        help="Put at most N rows in the page: of evaluate's predictions the N with the lowest CIDEr-D, else the "
             "first N. For very large files.")] = None,
    overlays: OverlaysOption = None,
    quiet: QuietOption = False,
) -> None:
    """Write one HTML page to browse the captions: search, scores, errors, and each word's attention on hover.

    Of evaluate's predictions it also shows each image's references, BLEU-4, CIDEr-D and objects, worst CIDEr-D
    first. The page works offline from disk; keep the thumbnail folder beside it.
    """
    from satcli.commands import report as step

    summary = step.run(step.ReportOptions(results=results, output=output, image_root=image_root,
                                          thumb_size=thumb_size, limit=limit))
    print_reported(summary)
    if overlays is not None:
        from satcli.pictures.overlays import write_overlays

        print_drawn(write_overlays(results, image_root, overlays))
