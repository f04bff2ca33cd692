"""The terminal: consoles and the one progress display every long step uses (bar, count, rate, ETA).

Human text (tables, progress, notes) goes to stderr, so stdout carries only results (captions, ``--json``) and
``satcli ... | jq`` works. When stderr is not a terminal (nohup, SLURM, CI logs) the bar becomes a line every
:data:`LINE_INTERVAL` seconds with the same count, rate and ETA.
"""

from __future__ import annotations

import logging
import os
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)  # human text: tables, per-epoch lines, notes
err_console = console
out_console = Console()  # results only: what a script reads from stdout
console.soft_wrap = not console.is_terminal  # in a log file, lines (paths, commands to copy) never wrap

# Seconds between progress lines when stderr is not a terminal ($SATCLI_PROGRESS_INTERVAL to change).
LINE_INTERVAL = 30.0


def _visible_escape(code: int) -> str:
    named = {9: "\\t", 10: "\\n", 13: "\\r"}
    if code in named:
        return named[code]
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (surrogateescape): the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# C0 and C1 control characters (ESC, CSI: a terminal obeys them), DEL, the bidirectional overrides (text that
# displays in another order than it reads) and the lone surrogates of undecodable file names.
_INVISIBLE = {code: _visible_escape(code) for code in (*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F),
                                                       *range(0x2066, 0x206A), *range(0xD800, 0xE000))}


def visible(text: object) -> str:
    """User-controlled text (a file name, a vocabulary word, a dataset name) safe to show on a terminal: every
    control character is written as a visible escape (``\\x1b``, ``\\n``), so no escape code reaches the terminal
    and a message stays one line. Plain text only: for rich markup use :func:`shown`."""
    return str(text).translate(_INVISIBLE)


def shown(text: object) -> str:
    """:func:`visible`, and square brackets escaped, for user text inside a rich markup string (a path holding
    ``[old]`` or ``[/x]`` is shown as it is, not read as a style)."""
    return escape(visible(text))


class VisibleRichHandler(RichHandler):
    """rich's log handler with every message passed through :func:`visible` (log lines name user files)."""

    def render_message(self, record, message: str):
        return super().render_message(record, visible(message))


class VisibleFormatter(logging.Formatter):
    """Plain log lines (stderr not a terminal) with the message passed through :func:`visible`, as on a terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 — logging's own name
        record.message = visible(record.message)
        return super().formatMessage(record)


def counted(n: int, noun: str) -> str:
    """``1 image``, ``1,200 images``: a count and its noun, in the plural unless it is one."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def set_quiet(quiet: bool) -> None:
    """``-q``: no progress, no tables or notes on stderr (warnings and errors still show; stdout unchanged)."""
    console.quiet = quiet


class RateColumn(ProgressColumn):
    """``12.3 images/s``: the task's speed in its own unit (``unit`` field)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text("" if task.speed is None else f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


class DetailColumn(ProgressColumn):
    """The task's ``detail`` field (``loss 2.314``), nothing until the task sets one."""

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("detail", ""), style="progress.data.speed")


class LineProgress(Progress):
    """A rich Progress that, when its console is not a terminal, prints plain lines instead of a live bar:
    ``captioning: 1,200/5,000 images (24%), 41.3 images/s, ETA 1:32`` at most every ``interval`` seconds and
    once when a task completes."""

    def __init__(self, *columns: ProgressColumn, interval: float | None = None, **kwargs):
        super().__init__(*columns, **kwargs)
        self.lines = not self.console.is_terminal
        if interval is None:
            interval = float(os.environ.get("SATCLI_PROGRESS_INTERVAL", LINE_INTERVAL))
        self.interval = interval
        self._started: dict[TaskID, tuple[float, float]] = {}  # task → (time, completed) when added
        self._printed: dict[TaskID, float] = {}

    def start(self) -> None:
        if not self.lines:
            super().start()

    def stop(self) -> None:
        if not self.lines:
            super().stop()

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        task = super().add_task(visible(description), *args, **kwargs)
        now = time.monotonic()
        self._started[task] = (now, self._tasks[task].completed)
        self._printed[task] = now
        return task

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def _line(self, task_id: TaskID) -> None:
        if not self.lines or self.disable or self.console.quiet:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if not finished and now - self._printed[task_id] < self.interval:
            return
        self._printed[task_id] = now
        self.console.print(progress_line(task, *self._started[task_id], now), highlight=False, markup=False,
                           soft_wrap=True)


def progress_line(task: Task, started: float, completed_at_start: float, now: float) -> str:
    """``description: done/total unit (pct%), rate unit/s, ETA h:mm:ss[, detail]`` (rate over this run's own
    work; ``detail``: the task's field of that name, e.g. ``loss 2.314``)."""
    unit = task.fields.get("unit", "it")
    done = task.completed
    seconds = max(now - started, 1e-9)
    rate = (done - completed_at_start) / seconds
    parts = [f"{task.description}: {done:,.0f}"]
    if task.total is not None:
        parts[0] += f"/{task.total:,.0f} {unit}"
        if task.total:
            parts[0] += f" ({100 * done / task.total:.0f}%)"
    else:
        parts[0] += f" {unit}"
    parts.append(f"{rate:,.1f} {unit}/s")
    if task.total is not None and done < task.total and rate > 0:
        parts.append(f"ETA {_clock((task.total - done) / rate)}")
    elif task.total is not None and done >= task.total:
        parts.append(f"done in {_clock(seconds)}")
    if task.fields.get("detail"):
        parts.append(task.fields["detail"])
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def make_progress(*extra: ProgressColumn) -> Progress:
    """The progress display: description, bar, count, rate, ETA, the task's ``detail`` field, then ``extra``."""
    progress = LineProgress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                            MofNCompleteColumn(), RateColumn(), TimeRemainingColumn(), DetailColumn(), *extra,
                            console=console, transient=True)
    progress.disable = console.quiet
    return progress
