"""Shared by the benchmarks: a description of the machine, median timing, and writing a docs section."""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from models.captioner import Captioner
    from satcli.training.options import TrainOptions
    from satcli.training.supervised import Stepper

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}{gpu}")


def command() -> str:
    """How to rerun this benchmark from the repository root."""
    module = "bench." + Path(sys.argv[0]).stem
    return " ".join(["python -m", module, *sys.argv[1:]])


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the ``## heading`` section of docs/benchmarks.md, keeping the other sections."""
    header = "# Benchmarks\n\nEvery table below comes from the command printed above it.\n"
    text = path.read_text() if path.exists() else header
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot (from /proc/stat; 0 where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much of the machine's CPU other processes used between ``start`` and ``share``."""

    def start(self) -> OtherLoad:
        self.wall, self.busy, self.own = time.perf_counter(), _machine_busy_seconds(), cpu_seconds()
        return self

    def share(self) -> float:
        """Fraction of all cores' time used by other processes."""
        others = (_machine_busy_seconds() - self.busy) - (cpu_seconds() - self.own)
        return max(others, 0.0) / ((time.perf_counter() - self.wall) * (os.cpu_count() or 1))


def decoder_stepper(options: TrainOptions, n_words: int, device: torch.device,
                    seed: int = 0) -> tuple[Captioner, Stepper]:
    """A captioner for ``options`` (pretrained encoder) and the training loop's own optimiser step on its decoder
    (``satcli.training.supervised.Stepper``, Adam at ``options.decoder_lr``, no AMP): ``(model, stepper)``."""
    from models.captioner import Captioner
    from satcli.training.distributed import Ranks
    from satcli.training.supervised import Stepper

    torch.manual_seed(seed)
    model = Captioner(options.model_config(n_words), pretrained_encoder=True).to(device)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=options.decoder_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return model, Stepper(model, model, optimizer, scaler, options, Ranks(), device)
