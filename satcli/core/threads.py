"""How many CPU threads torch uses, chosen so that a shared machine slows satcli down instead of collapsing it.

PyTorch's OpenMP threads spin-wait at the end of every parallel operation. Beside another CPU-heavy process,
a thread that has finished its share spins on a core while the thread it waits for is descheduled, and a
training epoch takes twenty times as long instead of twice. So before heavy torch work, ``train``, ``caption``,
``evaluate`` and ``demo`` make a :class:`ThreadPlan`, first match wins:

1. ``--threads N`` on the command line;
2. ``SATCLI_THREADS=N`` in the environment;
3. ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) already set, by the user or by a launcher (torchrun, Ray, Spark
   set it for their workers): respected as it is;
4. under an engine (:func:`configure_for_engine`, what the Ray and Spark adapters call): one thread per actor;
5. the machine: the CPUs this process may use (its affinity, capped by a cgroup CPU quota) minus the other
   threads running right now (``procs_running`` of ``/proc/stat``, the median of a few samples), at least 1 and at
   most torch's own default. On a quiet machine that is torch's default, unchanged.

Whatever the count, when other work already keeps some of our CPUs busy, waiting threads are told to sleep
instead of spin (``OMP_WAIT_POLICY=PASSIVE``), unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.
The OpenMP runtime reads that only when torch loads it, so it applies only when the plan is made before
``import torch``: the CLI does so (torch is not imported until a command runs). A library user of
``satcli.load`` keeps whatever threads the process has; calling :func:`configure_threads` before importing torch
gets the whole plan, after it the thread count only. :func:`plan_threads` is a pure function of its inputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from satcli.core.errors import SatcliError

log = logging.getLogger(__name__)

THREADS_ENV = "SATCLI_THREADS"
LAUNCHER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # set by the user, torchrun, Ray or Spark: respected
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # the user's own choice of waiting: never overridden
N_SAMPLES = 5  # samples of the running count, ...
SAMPLE_SECONDS = 0.01  # ... this far apart: one short burst of another process is not "the machine is busy"


@dataclass(frozen=True)
class MachineLoad:
    """What the machine looks like to this process right now."""

    n_cpus: int  # CPUs this process may run on: its affinity, capped by a cgroup CPU quota
    n_others: int  # threads of other work running or waiting to run (this process's own left out)


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads torch gets, whether waiting threads sleep, and why."""

    n_threads: int
    passive: bool  # several threads, and other work keeps some of our CPUs busy: waiters should sleep, not spin
    source: str  # "--threads", SATCLI_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS, "engine" or "machine"
    reason: str  # one human sentence: what was seen and what was chosen
    wait: str = "not applied yet"  # what happened to the OpenMP wait policy (see apply_wait_policy)

    def describe(self) -> str:
        """The INFO line: ``torch threads: 1 (the machine: ...); waiting threads: ...``."""
        return f"torch threads: {self.n_threads} ({self.reason}); waiting threads {self.wait}"


def parse_threads(value: str, name: str) -> int:
    """A thread count given as text (an option or an environment variable): a whole number ≥ 1."""
    try:
        n = int(value.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise SatcliError(f"{name}={value!r} is not a number of threads (a whole number, 1 or more)")
    return n


def plan_threads(requested: int | None, env: Mapping[str, str], load: MachineLoad,
                 torch_default: int | None = None, engine: bool = False) -> ThreadPlan:
    """The plan for these inputs (see the module's docstring for the order). ``torch_default``: the threads torch
    would use on its own (None before torch is imported: the CPUs stand in for it)."""
    capacity = max(1, min(load.n_cpus, torch_default or load.n_cpus))
    busy = load.n_others > load.n_cpus - capacity  # other work needs CPUs our threads would use
    n, source, why = _count(requested, env, load, capacity, engine)
    return ThreadPlan(n, busy and n > 1, source, why)


def _count(requested: int | None, env: Mapping[str, str], load: MachineLoad, capacity: int,
           engine: bool) -> tuple[int, str, str]:
    """(threads, source, reason) by the rules' order."""
    seen = f"{load.n_others} other thread{'s' * (load.n_others != 1)} running"
    if requested is not None:
        if requested < 1:
            raise SatcliError(f"--threads {requested}: give 1 or more")
        return requested, "--threads", f"--threads {requested}; {seen}"
    if env.get(THREADS_ENV, "").strip():
        n = parse_threads(env[THREADS_ENV], THREADS_ENV)
        return n, THREADS_ENV, f"{THREADS_ENV}={n}; {seen}"
    for name in LAUNCHER_ENV:
        value = env.get(name, "").strip()
        if value:
            return _launcher_threads(value) or capacity, name, f"{name}={value} set before satcli started: respected"
    if engine:
        return 1, "engine", "one per actor under an engine; SATCLI_THREADS changes it"
    n_free = load.n_cpus - load.n_others
    n = max(1, min(capacity, n_free))
    if n == capacity:
        return n, "machine", f"{load.n_cpus} CPUs for this process, {seen}: torch's default"
    return n, "machine", f"{load.n_cpus} CPUs for this process, {seen}: {max(n_free, 0)} free"


def _launcher_threads(value: str) -> int | None:
    """OMP_NUM_THREADS may be a list for nested levels (``4,2``): the first is the one torch's pool gets."""
    first = value.split(",", 1)[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# What the machine looks like (the impure inputs of plan_threads)
# ---------------------------------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, int(quota))) if quota else max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None without one."""
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def running_threads() -> int | None:
    """Threads on the machine running or ready to run now, this one included (None where it cannot be read)."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def own_running_threads() -> int:
    """This process's threads running or ready to run now, the calling one included (1 where unreadable)."""
    n = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError, IndexError):
                n += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    except OSError:
        return 1
    return max(n, 1)


def read_load(n_samples: int = N_SAMPLES, interval: float = SAMPLE_SECONDS) -> MachineLoad:
    """This process's CPUs and the other work running on the machine (the median of ``n_samples`` counts; this
    process's own running threads left out, so that a running job does not count its own threads as others)."""
    counts = []
    for i in range(n_samples):
        if i:
            time.sleep(interval)
        count = running_threads()
        if count is not None:
            counts.append(count - own_running_threads())
    if counts:
        n_others = int(statistics.median_low(counts))
    else:  # no /proc (macOS, Windows): the 1-minute load average, or a quiet machine
        try:
            n_others = int(os.getloadavg()[0])
        except (AttributeError, OSError):
            n_others = 0
    return MachineLoad(n_cpus=usable_cpus(), n_others=max(0, n_others))


# ---------------------------------------------------------------------------------------------------------------
# Applying a plan
# ---------------------------------------------------------------------------------------------------------------


def apply_wait_policy(plan: ThreadPlan, env: MutableMapping[str, str] = os.environ) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``env`` when the plan wants sleeping waiters and it can still work
    (torch not imported yet, the user set no wait policy of their own). Returns what happened, in words."""
    own = [f"{name}={env[name]}" for name in WAIT_ENV if env.get(name)]
    if own:
        return f"as set before satcli started ({', '.join(own)})"
    if not plan.passive:
        return "spin, then sleep (OpenMP's default)"
    if "torch" in sys.modules:
        return "spin (torch was loaded first: set OMP_WAIT_POLICY=PASSIVE before importing it)"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "sleep (OMP_WAIT_POLICY=PASSIVE)"


_TORCH_DEFAULT: list[int] = []  # torch's own thread count, read the first time a plan is applied
_ACTIVE: list[ThreadPlan] = []  # the plan configure_threads made for this process, which follow_machine follows
_LAST_LOOK: list[float] = [0.0]
REFRESH_SECONDS = 2.0  # how often a long job looks at the machine again (a look costs ~10 ms of sampling)


def configure_threads(requested: int | None = None, *, engine: bool = False,
                      load: MachineLoad | None = None) -> ThreadPlan:
    """Choose and apply this process's threads (the module's docstring has the rules): the OpenMP wait policy
    when torch is not loaded yet, then ``torch.set_num_threads``. Logs the choice at INFO and returns it."""
    load = load if load is not None else read_load()
    early = plan_threads(requested, os.environ, load, engine=engine)
    wait = apply_wait_policy(early)
    import torch

    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    plan = plan_threads(requested, os.environ, load, torch_default=_TORCH_DEFAULT[0], engine=engine)
    if torch.get_num_threads() != plan.n_threads:
        torch.set_num_threads(plan.n_threads)
    plan = ThreadPlan(torch.get_num_threads(), plan.passive, plan.source, plan.reason, wait)
    # said at INFO when satcli changed something (fewer threads than torch's own, sleeping waiters); torch's own
    # choice on a quiet machine is no news, so it stays at DEBUG (-v)
    changed = plan.n_threads != _TORCH_DEFAULT[0] or wait.startswith("sleep")
    log.log(logging.INFO if changed else logging.DEBUG, plan.describe())
    _ACTIVE[:] = [plan]
    return plan


def refresh_threads(plan: ThreadPlan, load: MachineLoad | None = None) -> ThreadPlan:
    """Look at the machine again and follow it, for a long job that made ``plan`` at its start (call it from the
    thread that runs torch, between steps, every few seconds at most). Only a plan the machine decided changes:
    a count the user, a launcher or an engine set stays. The wait policy cannot change once torch is loaded."""
    if plan.source != "machine":
        return plan
    import torch

    load = load if load is not None else read_load(n_samples=3, interval=0.002)
    new = plan_threads(None, {}, load, torch_default=(_TORCH_DEFAULT or [torch.get_num_threads()])[0])
    if new.n_threads == plan.n_threads:
        return plan
    torch.set_num_threads(new.n_threads)
    log.info("torch threads: %d, was %d (%s)", new.n_threads, plan.n_threads, new.reason)
    return ThreadPlan(new.n_threads, plan.passive, plan.source, new.reason, plan.wait)


def follow_machine(load: MachineLoad | None = None, now: float | None = None) -> ThreadPlan | None:
    """For the loop of a long job, called between steps (cheap: it looks at the machine every
    :data:`REFRESH_SECONDS` at most): :func:`refresh_threads` of this process's plan, so a training that started on
    a quiet machine gives its cores to work that arrives later (one thread never spins against it) and takes them
    back when it leaves. A count set by the user, a launcher or an engine never changes. None before any plan."""
    if not _ACTIVE:
        return None
    now = time.monotonic() if now is None else now
    if now - _LAST_LOOK[0] >= REFRESH_SECONDS:
        _LAST_LOOK[0] = now
        _ACTIVE[0] = refresh_threads(_ACTIVE[0], load)
    return _ACTIVE[0]


def configure_for_engine() -> ThreadPlan:
    """For engine adapters (a Ray actor, a Spark task): one torch thread per actor, unless the engine or the user
    said otherwise (``OMP_NUM_THREADS``, ``SATCLI_THREADS``). Call it before the model is loaded."""
    return configure_threads(engine=True)
