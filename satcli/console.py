"""The terminal: consoles and the one progress display every long step uses (bar, count, rate, ETA)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """``12.3 images/s``: the task's speed in its own unit (``unit`` field)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text("" if task.speed is None else f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


def make_progress(*extra: ProgressColumn) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeRemainingColumn(), *extra, console=err_console, transient=True)
