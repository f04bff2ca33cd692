"""A shared machine: training and captioning alone and beside a competing CPU job, old threads and new, one run.

    python -m bench.shared_machine [--seconds 10] [--rounds 2] [--write]
    python -m bench.shared_machine --quick          # a sanity run: a few minutes on a quiet machine

Two workloads, each in a fresh process (the OpenMP wait policy is read once, when torch loads):

- train: the demo's decoder (256/128/128, default encoder's cached features, batch 64) stepped by the training
  loop's own reader and optimiser step (``satcli.training.batches`` + ``Stepper``), captions/s over ``--seconds``;
- caption: ``satcli.commands.caption.run`` end to end over ``--images`` JPEGs of 800×600 (EfficientNet-Lite0,
  a random 512/512/512 decoder, beam 3, max length 20, DataLoader workers as satcli chooses), images/s.

Each under two thread behaviours:

- old: torch's defaults, as satcli did before ``satcli.core.threads`` (every core, OpenMP spin-waiting);
- new: ``satcli.core.threads.configure_threads()`` called before torch loads, as ``satcli train``/``caption`` do.

The competitor is another process running a loop of 384×384 float32
matmuls with torch's default threads (every core, spin-waiting), the way a second PyTorch job (another satcli
run from before this change, a test suite's model tests) uses a machine. The bench starts it, waits until it is
computing, measures, then stops it; it also stops itself after ``--seconds`` + 60 s. The competitor's own
matmuls/s are reported too, so that "new" is seen not to win by starving it.

Three machine states: alone; loaded (the competitor runs before the job starts); later (the competitor starts
just after the job chose its threads: what a job that started on a quiet machine meets). The ratios loaded/alone
and later/alone (target ≥ 0.4) are taken within a round, then the median over rounds; new/old alone says what
the policy costs on a quiet machine (target ≥ 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch's own choice of threads and waiting: what "old" runs with, and "new" starts from
CLEAN_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SATCLI_THREADS")
MATMUL = 384
CAPTION = {"batch_size": 16, "beam_size": 3, "max_length": 20}


# ---------------------------------------------------------------------------------------------------------------
# Workers (each its own process: python -m bench.shared_machine --worker KIND ...)
# ---------------------------------------------------------------------------------------------------------------


def _plan(policy: str) -> str:
    """Apply the policy before torch is imported; what torch ends up with, in words."""
    if policy == "new":
        from satcli.core.threads import configure_threads

        plan = configure_threads()
        return f"{plan.n_threads} thread{'s' * (plan.n_threads > 1)}" + (", passive" if plan.passive else "")
    import torch

    return f"{torch.get_num_threads()} threads, spin"


def _train_worker(root: Path, seconds: float) -> float:
    """Captions/s of the training loop's reader + optimiser step on cached features, over ``seconds``."""
    import itertools

    import torch

    from bench.common import decoder_stepper
    from satcli.core.threads import follow_machine
    from satcli.data.features import cached_features
    from satcli.data.store import StoredDataset
    from satcli.training.batches import CaptionTable, batch_plan, feature_batches, prefetch
    from satcli.training.distributed import Ranks

    dataset = StoredDataset.open(root, "shapes")
    options = _train_options(root)
    table = CaptionTable.from_store(dataset, "train")
    model, step = decoder_stepper(options, len(dataset.vocab), torch.device("cpu"))
    features = cached_features(dataset, "train", model, torch.device("cpu"))
    n_captions, started = 0, None
    for epoch in itertools.count():
        plan = batch_plan(table.lengths, options.batch_size, seed=0, epoch=epoch)
        for f, tokens, lengths, n, n_tokens in prefetch(feature_batches(features, table, plan, Ranks())):
            follow_machine()  # as the training loop does between steps (a no-op without a plan: "old")
            step(f, tokens, lengths, n, n_tokens)
            if started is None:  # the first step warms up, not timed
                started = time.perf_counter()
                continue
            n_captions += n
            if time.perf_counter() - started >= seconds:
                return n_captions / (time.perf_counter() - started)
    raise AssertionError("unreachable")


def _caption_worker(root: Path, seconds: float) -> float:
    """Images/s of ``satcli caption`` over the bench's JPEGs: the median of runs until ``seconds`` have passed."""
    from satcli.captioning.options import CaptionOptions
    from satcli.commands.caption import run

    options = CaptionOptions(inputs=(str(root / "photos"),), model=root / "efficientnet-lite0.pt",
                             output=root / f"out-{os.getpid()}.parquet", overwrite=True, device="cpu",
                             progress=False, **CAPTION)
    rates, started = [], time.perf_counter()
    while not rates or time.perf_counter() - started < seconds:
        took = time.perf_counter()
        summary = run(options)
        assert summary.n_captioned == summary.n_images, "every bench image must be captioned"
        rates.append(summary.n_images / (time.perf_counter() - took))
    return statistics.median(rates)


def _compete(seconds: float) -> None:
    """The competitor: matmuls with torch's default threads until stopped or ``seconds`` pass; prints matmuls/s."""
    import torch

    a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
    a @ b
    print("ready", flush=True)
    n, started = 0, time.perf_counter()
    signal.signal(signal.SIGTERM, _stop)
    try:
        while time.perf_counter() - started < seconds:
            a @ b
            n += 1
    finally:
        print(json.dumps({"matmuls_per_s": n / (time.perf_counter() - started)}), flush=True)


def _stop(*_: object) -> None:
    raise SystemExit(0)


def _train_options(root: Path):
    from satcli.training.options import TrainOptions

    # the demo's recipe (satcli.commands.demo.demo_train_options), on the default encoder's cached features
    return TrainOptions(dataset="shapes", data_root=root, embed_dim=128, attention_dim=128, decoder_dim=256,
                        dropout=0.5, batch_size=64, decoder_lr=2e-3, device="cpu")


def worker(args: argparse.Namespace) -> None:
    if args.worker == "compete":
        _compete(args.seconds)
        return
    plan = _plan(args.policy)
    print("planned", flush=True)
    if args.wait:  # "later": the competitor starts now, after this process chose its threads
        sys.stdin.readline()
    rate = (_train_worker if args.worker == "train" else _caption_worker)(Path(args.root), args.seconds)
    print(json.dumps({"rate": rate, "plan": plan}), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The conductor
# ---------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    return env


def _spawn(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.shared_machine", *arguments], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, env=_env())


def _start_competitor(seconds: float) -> subprocess.Popen[str]:
    competitor = _spawn("--worker", "compete", "--seconds", str(seconds + 60))
    assert competitor.stdout is not None and competitor.stdout.readline().strip() == "ready"
    return competitor


def measure(kind: str, policy: str, state: str, root: Path, seconds: float) -> dict:
    """One measurement in a fresh process: ``alone``; ``loaded``, beside a competitor already running when it
    starts; ``later``, beside a competitor that starts once it has chosen its threads."""
    competitor, matmuls = None, None
    if state == "loaded":
        competitor = _start_competitor(seconds)
    try:
        job = _spawn("--worker", kind, "--policy", policy, "--root", str(root), "--seconds", str(seconds),
                     *(["--wait"] if state == "later" else []))
        assert job.stdout is not None and job.stdin is not None and job.stdout.readline().strip() == "planned"
        if state == "later":
            competitor = _start_competitor(seconds)
            job.stdin.write("go\n")
            job.stdin.flush()
        out, _ = job.communicate(timeout=seconds * 20 + 120)
        if job.returncode:
            raise SystemExit(f"the {kind} worker failed (exit {job.returncode})")
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if competitor is not None:
            competitor.terminate()
            out, _ = competitor.communicate(timeout=30)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            matmuls = json.loads(lines[-1])["matmuls_per_s"] if lines else float("nan")
    result["competitor"] = matmuls
    print(f"  {kind:7} {policy} {state:6}: {result['rate']:8.1f}/s  ({result['plan']})"
          + (f", competitor {matmuls:.0f} matmuls/s" if competitor else ""), flush=True)
    return result


def prepare(root: Path, n_train: int, n_images: int) -> None:
    """The shapes store with its feature cache (train), and JPEGs with a checkpoint (caption)."""
    import torch

    from bench.caption_throughput import make_checkpoint, make_photos
    from bench.common import decoder_stepper
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.features import cached_features
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind, StoredDataset

    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=n_train, n_val=10, n_test=10,
                                 n_heldout=0))
    dataset = StoredDataset.open(root, "shapes")
    model, _ = decoder_stepper(_train_options(root), len(dataset.vocab), torch.device("cpu"))
    cached_features(dataset, "train", model, torch.device("cpu"))
    make_photos(root / "photos", n_images, size=(800, 600))
    make_checkpoint(root, "efficientnet-lite0")


def _competitor_alone(seconds: float) -> float:
    job = _spawn("--worker", "compete", "--seconds", str(seconds))
    out, _ = job.communicate(timeout=seconds + 60)
    return json.loads(out.strip().splitlines()[-1])["matmuls_per_s"]


SET_HERE = " (this conductor's OMP_NUM_THREADS; the jobs run without it: their threads are in the last column)"
ABOUT = (  # how the docs/benchmarks.md section opens
    "PyTorch's OpenMP threads spin-wait at the end of every parallel operation, so two CPU-heavy jobs on the same "
    'cores collapse each other instead of sharing them (before this change, a demo training beside one other job '
    'ran about 20× slower, not 2×). `train`, `caption`, `evaluate` and `demo` now choose their threads as they '
    'start (`satcli/core/threads.py`, README "On a shared machine"): `--threads N`, else `SATCLI_THREADS`, else an '
    '`OMP_NUM_THREADS` or `MKL_NUM_THREADS` already set (torchrun, Ray, Spark), else the CPUs this process may use '
    '(affinity, cgroup quota) less the other threads running now (`procs_running` of /proc/stat, the median of 5 '
    "samples 10 ms apart), at least 1 and at most torch's default; when other work needs CPUs our threads would "
    'use, waiting threads sleep (`OMP_WAIT_POLICY=PASSIVE`, set before torch loads). On a quiet machine that is '
    'torch\'s default, unchanged. "old" below is torch\'s default everywhere, as satcli ran before.'
)


STATES = {"old": ("alone", "loaded"), "new": ("alone", "loaded", "later")}  # old never looks: later == loaded


def table(results: dict, args: argparse.Namespace, competitor_alone: float, load_before: str,
          other_load: float) -> str:
    from bench.common import command, machine

    def rate(kind: str, policy: str, state: str) -> str:
        if (kind, policy, state) not in results:
            return "—"
        return f"{statistics.median(r['rate'] for r in results[kind, policy, state]):.1f}"

    def ratio(kind: str, a: tuple[str, str], b: tuple[str, str]) -> float:
        pairs = zip(results[(kind, *a)], results[(kind, *b)], strict=True)
        return statistics.median(x["rate"] / y["rate"] for x, y in pairs)

    def cell(kind: str, policy: str, state: str) -> str:
        if (kind, policy, state) not in results:
            return "—"
        return f"**{ratio(kind, (policy, state), (policy, 'alone')):.2f}**"

    def plans(kind: str, policy: str) -> str:
        return " / ".join("; ".join(sorted({r["plan"] for r in results[kind, policy, state]}))
                          for state in STATES[policy])

    def matmuls(kind: str, policy: str) -> str:
        return " / ".join(f"{statistics.median(r['competitor'] for r in results[kind, policy, state]):.0f}"
                          for state in STATES[policy][1:])

    unit = {"train": "captions/s", "caption": "images/s"}
    lines = ["| workload | threads | alone | loaded | later | loaded/alone | later/alone | competitor matmuls/s, "
             f"loaded / later (alone: {competitor_alone:.0f}) | torch threads: alone / loaded / later |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for kind in args.workloads:
        for policy in ("old", "new"):
            lines.append(f"| {kind} ({unit[kind]}) | {policy} | {rate(kind, policy, 'alone')} | "
                         f"{rate(kind, policy, 'loaded')} | {rate(kind, policy, 'later')} | "
                         f"{cell(kind, policy, 'loaded')} | {cell(kind, policy, 'later')} | {matmuls(kind, policy)} | "
                         f"{plans(kind, policy)} |")
    alone = ", ".join(f"{kind} {ratio(kind, ('new', 'alone'), ('old', 'alone')):.2f}" for kind in args.workloads)
    return "\n".join([
        ABOUT, "", f"Command: `{command()}`", "",
        f"Machine: {machine()}{SET_HERE if os.environ.get('OMP_NUM_THREADS') else ''}; "
        f"load average before the run: {load_before}; other processes used "
        f"{100 * other_load:.0f}% of the machine's CPU time while it ran (from /proc/stat).", "",
        f"Each cell is the median of {args.rounds} round(s) of {args.seconds:g} s, each in a fresh process (train: "
        f"shapes, {args.n_train} training images, the demo's decoder on cached features, batch 64; caption: "
        f"{args.images} JPEGs of 800×600, EfficientNet-Lite0, beam 3, batch 16, satcli's own decode workers). "
        "alone: no competitor; loaded: the competitor (another process looping over "
        f"{MATMUL}×{MATMUL} matmuls with torch's default threads) runs before the job starts; later: it starts just "
        "after the job chose its threads (old never looks at the machine, so its later is its loaded).", "",
        *lines, "", f"Alone, new/old (target ≥ 0.95 on a quiet machine): {alone}.",
    ])


def conduct(args: argparse.Namespace) -> None:
    from bench.common import OtherLoad, write_section

    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    with tempfile.TemporaryDirectory(prefix="satcli-shared-") as tmp:
        root = Path(tmp)
        print(f"preparing {args.n_train} shapes images, their features and {args.images} JPEGs ...", flush=True)
        prepare(root, args.n_train, args.images)
        load = OtherLoad().start()
        competitor_alone = _competitor_alone(min(args.seconds, 5.0))
        results: dict = {}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for kind in args.workloads:
                for policy, states in STATES.items():
                    for state in states:
                        results.setdefault((kind, policy, state), []).append(
                            measure(kind, policy, state, root, args.seconds))
        other_load = load.share()
    body = table(results, args, competitor_alone, load_before, other_load)
    print(body)
    if args.write:
        write_section("A shared machine (bench/shared_machine.py)", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell and round")
    parser.add_argument("--rounds", type=int, default=2, help="every cell this many times, in turn")
    parser.add_argument("--n-train", type=int, default=600, help="shapes training images (5 captions each)")
    parser.add_argument("--images", type=int, default=64, help="JPEGs to caption per caption run")
    parser.add_argument("--workloads", type=lambda text: text.split(","), default=["train", "caption"],
                        metavar="train,caption", help="which workloads to measure")
    parser.add_argument("--quick", action="store_true", help="a sanity run: 1 round of 3 s, fewer images")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--worker", choices=("train", "caption", "compete"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", choices=("old", "new"), default="new", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.seconds, args.rounds, args.n_train, args.images = 3.0, 1, 120, 12
    conduct(args)


if __name__ == "__main__":
    main()
