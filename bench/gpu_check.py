"""The GPU check: everything satcli does on CUDA, proven and timed by one command on a lent GPU machine.

    python -m bench.gpu_check [--out DIR] [--budget 340]      # on a CUDA machine, under 6 minutes
    python -m bench.gpu_check --device cpu --quick             # the same steps, tiny, on a CPU: a dry run

Steps, each in its own process with its own time limit (a step that fails or runs out of time costs only itself):

  env      the GPU, the driver, torch, satcli's worker count for the device
  tests    the CUDA-only tests (every test file with a ``cuda`` marker, ``-m cuda``), then a CUDA pass of the
           model and decoding tests (``SATCLI_TEST_DEVICE=cuda``: every tensor they make lands on the GPU)
  precision  ``satcli caption`` and ``satcli evaluate`` give the same pictures the same captions (tokens and
           sum_logprob) on the GPU: one precision policy (tests/test_references.py)
  caption  bench.caption_throughput on the GPU: beam 1/3/5, EfficientNet-Lite0 224 px and ResNet-101 256 px,
           (a) ``satcli caption`` from JPEG files, (b) the model-only floor from tensors on the GPU, (c) one image
           at a time; (a′) is (a) again with the GPU JPEG decoder off (``SATCLI_GPU_JPEG=0``)
  decode   bench.jpeg_decode: images/s of JPEG decoding alone, CPU workers against nvJPEG
  train    bench.train_throughput on the GPU: the feature cache against the pure decoder floor
  ray      ``satcli caption SHARDS --engine ray`` on a local Ray cluster with one GPU actor (docs/scale.md): its
           rows against ``satcli caption``'s on the same WebDataset shards and GPU, and images/s of both
           (needs ray: ``pip install 'satcli[ray]'``; without it the step says so and is not counted as failed)
  demo     ``satcli demo`` on the GPU (mixed precision, as ``satcli train`` uses on CUDA): its scores beside the
           CPU demo's in README.md, and the time per epoch

Results go to one folder: ``gpu_check.md`` (every table) and ``gpu_check.log`` (every step's output). The folder
is ``--out``, else ``$OUT`` (the device tool's), else ``gpu-check/``. Without a CUDA GPU (and no ``--device``)
the check says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("env", "tests", "precision", "caption", "decode", "train", "ray", "demo")
# Seconds each step may take on the GPU; the whole check stops starting steps when --budget is spent.
LIMITS = {"env": 20, "tests": 100, "precision": 60, "caption": 130, "decode": 40, "train": 90, "ray": 120, "demo": 150}
CPU_DEMO = {  # README.md's Results table: `satcli demo` on the project's 2-core CPU, 6 epochs, beam 3
    "bleu1": 73.5, "bleu2": 64.2, "bleu3": 53.6, "bleu4": 42.8, "coco_cider_d": 263.1,
}
CPU_DEMO_EPOCH = "~55 s at ~350 captions/s"
FAILURES: list[str] = []  # what went wrong inside a step: its process then exits 1
SKIP_LINE = "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check"


# ---------------------------------------------------------------------------------------------------------------
# The steps, each run in a child process: ``python -m bench.gpu_check --step NAME``; each prints markdown
# ---------------------------------------------------------------------------------------------------------------


def _python(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python ARGS`` from the repository root; (exit status, stdout and stderr)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env["PYTHONUNBUFFERED"] = "1"
    child = subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                             stderr=sys.stderr, text=True)
    lines = []
    for line in child.stdout:  # into the log as it comes, so a step killed for time shows how far it got
        sys.stderr.write(line)
        sys.stderr.flush()
        lines.append(line)
    return child.wait(), "".join(lines)


def step_env(args: argparse.Namespace) -> str:
    import torch

    from satcli.data.feed import default_workers

    device = torch.device(args.device)
    lines = ["| | |", "|---|---|", f"| Python | {platform.python_version()} |",
             f"| torch | {torch.__version__} (CUDA {torch.version.cuda}) |", f"| CPUs | {os.cpu_count()} |",
             f"| satcli decode workers on {device.type} | {default_workers(device)} |"]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines += [f"| GPU | {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
                  f"{properties.multi_processor_count} SMs |",
                  f"| bf16 | {torch.cuda.is_bf16_supported()} |"]
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            lines.append(f"| driver | {smi.stdout.strip()} |")
    return "\n".join(lines)


def step_tests(args: argparse.Namespace) -> str:
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                    if "mark.cuda" in p.read_text(encoding="utf-8"))
    runs = [("CUDA-only tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *marked], {})]
    model_tests = ["tests/test_decoding.py", "tests/test_captioner.py"]
    if args.quick:  # a dry run: collect the CUDA tests, run one model test with the device switch
        runs = [("CUDA-only tests (collected only)", [*runs[0][1], "--collect-only"], {}),
                (f"model tests with SATCLI_TEST_DEVICE={args.device} (one)",
                 ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_captioner.py", "-k",
                  "forward_shapes"], {"SATCLI_TEST_DEVICE": args.device})]
    else:
        runs.append((f"model and decoding tests with SATCLI_TEST_DEVICE={args.device}",
                     ["-m", "pytest", "-q", "-p", "no:cacheprovider", *model_tests],
                     {"SATCLI_TEST_DEVICE": args.device}))
    lines = ["| run | files | exit | pytest's summary |", "|---|---|---:|---|"]
    for name, command, env in runs:
        status, output = _python(*command, env=env)
        summary = next((line for line in reversed(output.splitlines()) if line.strip()), "(no output)")
        files = ", ".join(f for f in command if f.startswith("tests/"))
        lines.append(f"| {name} | {files} | {status} | {summary.strip('= ')} |")
        if status != 0:
            FAILURES.append(name)
    return "\n".join(lines)


def step_precision(args: argparse.Namespace) -> str:
    """caption and evaluate on the same pictures give the same captions (tokens and sum_logprob) on the device:
    one precision policy (satcli.data.features.encode_images)."""
    test = "agree_on_cuda" if args.device.startswith("cuda") else "same_image_the_same_caption"
    command = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_references.py", "-k", test]
    status, output = _python(*command)
    summary = next((line for line in reversed(output.splitlines()) if line.strip()), "(no output)")
    if status != 0 or "skipped" in summary:
        FAILURES.append("precision")
    return "\n".join(["| check | exit | pytest's summary |", "|---|---:|---|",
                      f"| caption and evaluate agree on {args.device} ({test}) | {status} | {summary.strip('= ')} |"])


def _bench(module: str, options: list[str]) -> str:
    status, output = _python("-m", module, *options)
    start = output.find("Command: `")  # the bench's table; what it printed before (progress) is in the log
    body = output[start:] if start >= 0 else output
    if status != 0:
        FAILURES.append(module)
        return f"failed (exit {status}); see gpu_check.log\n\n{body.strip()}"
    return body.strip()


def step_caption(args: argparse.Namespace) -> str:
    sizes = (["--images", "8", "--slow-images", "4", "--repeats", "1", "--beams", "1", "--max-length", "4"]
             if args.quick else ["--images", "192", "--slow-images", "96", "--repeats", "2", "--beams", "1,3,5"])
    return _bench("bench.caption_throughput", [*sizes, "--device", args.device, "--variant", "SATCLI_GPU_JPEG=0"])


def step_decode(args: argparse.Namespace) -> str:
    return _bench("bench.jpeg_decode", ["--images", "16" if args.quick else "256", "--device", args.device])


def step_train(args: argparse.Namespace) -> str:
    sizes = ["--n-train", "40", "--steps", "2", "--rounds", "1"] if args.quick else ["--steps", "20", "--rounds", "3"]
    return _bench("bench.train_throughput", [*sizes, "--device", args.device])


def step_demo(args: argparse.Namespace) -> str:
    import logging

    from satcli.commands.demo import DemoOptions, run
    from satcli.training.run import METRICS

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    options = DemoOptions(data_root=work / "data", out=work / "demo", device=args.device)
    if args.quick:
        options = DemoOptions(data_root=work / "data", out=work / "demo", device=args.device, epochs=1,
                              n_train=40, n_val=10, n_test=10)
    with contextlib.redirect_stdout(sys.stderr):  # the demo's own tables go to the log; stdout is the report
        result = run(options)
    history = [json.loads(line) for line in (options.out / METRICS).read_text().splitlines() if line.strip()]
    epochs = [h for h in history if "seconds" in h]
    lines = ["| | CPU demo (README.md, 2 cores) | this run |", "|---|---:|---:|"]
    names = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "coco_cider_d": "CIDEr-D"}
    for key, name in names.items():
        lines.append(f"| {name} | {CPU_DEMO[key]:.1f} | {100 * result.scores.get(key, float('nan')):.1f} |")
    per_epoch = ", ".join(f"{h['seconds']:.1f} s ({h.get('samples_per_s', 0):.0f} captions/s)" for h in epochs)
    lines.append(f"| time per epoch | {CPU_DEMO_EPOCH} | {per_epoch} |")
    lines.append(f"| whole demo | 8.4 min | {result.seconds / 60:.1f} min |")
    return (f"`satcli demo --device {args.device}` ({options.epochs} epochs, {options.n_train} training images, "
            f"beam {options.beam_size}):\n\n" + "\n".join(lines))


def _write_shards(folder: Path, n_shards: int, per_shard: int) -> str:
    """WebDataset tar shards of random JPEGs (a .jpg and a .json per sample); returns their brace pattern."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG")
                for name, data in ((f"{s:05d}{i:04d}.jpg", buffer.getvalue()), (f"{s:05d}{i:04d}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def step_ray(args: argparse.Namespace) -> str:
    try:
        import ray
    except ImportError:
        return "not run: ray is not installed here (`pip install 'satcli[ray]'`)"
    import pyarrow as pa
    import pyarrow.parquet as pq

    from satcli.captioning.options import CaptionOptions
    from satcli.commands.caption import run
    from tests.helpers import picture_sensitive_checkpoint

    work = Path(args.work)
    n_shards, per_shard = (2, 4) if args.quick else (8, 64)
    pattern = _write_shards(work / "shards", n_shards, per_shard)
    model = picture_sensitive_checkpoint(work)
    columns = ["path", "key", "caption", "tokens", "sum_logprob", "attention", "error"]
    tables, rates = {}, {}
    ray.init(num_cpus=2, num_gpus=1 if args.device != "cpu" else 0, include_dashboard=False, log_to_driver=False)
    try:
        for engine in ("local", "ray"):
            summary = run(CaptionOptions(inputs=(pattern,), model=model, output=str(work / engine), device=args.device,
                                         progress=False, engine=engine, actors=1))
            rates[engine] = summary.images_per_second
            tables[engine] = pa.concat_tables([pq.read_table(p).select(columns)
                                               for p in sorted((work / engine).glob("*.parquet"))])
            print(f"{engine}: {summary.device}", file=sys.stderr)  # noqa: T201 — into the log
    finally:
        ray.shutdown()
    same = tables["local"].to_pylist() == tables["ray"].to_pylist()
    if not same:
        FAILURES.append("ray rows")
    return "\n".join([f"{n_shards} shards of {per_shard} JPEGs (320×240), one GPU actor:", "",
                      "| | images/s |", "|---|---:|", f"| satcli caption | {rates['local']:.1f} |",
                      f"| --engine ray, 1 actor | {rates['ray']:.1f} |", "",
                      f"Rows identical (path, key, caption, tokens, sum_logprob, attention, error): "
                      f"{'yes' if same else 'NO'} ({tables['ray'].num_rows} rows)"])


STEP_FUNCTIONS = {"env": step_env, "tests": step_tests, "precision": step_precision, "caption": step_caption,
                  "decode": step_decode, "train": step_train, "ray": step_ray, "demo": step_demo}


# ---------------------------------------------------------------------------------------------------------------
# The check: every step in turn, within the budget, into one folder
# ---------------------------------------------------------------------------------------------------------------


def check(args: argparse.Namespace, out: Path) -> int:
    """Run the steps; returns how many failed or ran out of time."""
    out.mkdir(parents=True, exist_ok=True)
    report, log_path = out / "gpu_check.md", out / "gpu_check.log"
    started = time.perf_counter()
    sections = [f"# GPU check ({'quick, ' if args.quick else ''}device {args.device})", "",
                f"Command: `python -m bench.gpu_check {' '.join(sys.argv[1:])}`".replace("  ", " ")]
    n_failed = 0
    with tempfile.TemporaryDirectory(prefix="satcli-gpu-check-") as work, open(log_path, "w") as log:
        for name in args.steps:
            left = args.budget - (time.perf_counter() - started)
            limit = min(LIMITS[name] * (3 if args.device == "cpu" else 1), left)
            if limit < 5:
                sections += ["", f"## {name}", "", f"not run: the budget of {args.budget} s was spent"]
                n_failed += 1
                continue
            command = [sys.executable, "-m", "bench.gpu_check", "--step", name, "--device", args.device,
                       "--work", work, *(["--quick"] if args.quick else [])]
            log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
            log.flush()
            step_started = time.perf_counter()
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
            # Its own process group: a step out of time is killed with the benchmark processes it started.
            child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                     start_new_session=True)
            try:
                stdout, _ = child.communicate(timeout=limit)
                body, status = stdout.strip(), child.returncode
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                stdout, _ = child.communicate()
                body, status = f"timed out after {limit:.0f} s\n\n{(stdout or '').strip()}", "timeout"
            seconds = time.perf_counter() - step_started
            n_failed += status != 0
            verdict = "ok" if status == 0 else f"FAILED ({status})"
            sections += ["", f"## {name}: {verdict}, {seconds:.0f} s", "", body]
            print(f"gpu_check: {name}: {verdict} in {seconds:.0f} s", flush=True)  # noqa: T201 — its report
            report.write_text("\n".join(sections) + "\n")  # after every step: a later kill keeps what is done
    total = time.perf_counter() - started
    sections += ["", f"Total: {total:.0f} s, {n_failed} of {len(args.steps)} steps failed."]
    report.write_text("\n".join(sections) + "\n")
    print(f"gpu_check: {len(args.steps) - n_failed} of {len(args.steps)} steps ok in {total:.0f} s; "  # noqa: T201
          f"results in {report}", flush=True)
    return n_failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else gpu-check/)")
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, times nothing")
    parser.add_argument("--budget", type=float, default=340, help="seconds for all steps (default 340)")
    parser.add_argument("--steps", type=lambda s: s.split(","), default=list(STEPS), help=",".join(STEPS))
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in a child process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(STEP_FUNCTIONS[args.step](args), flush=True)  # noqa: T201 — read by the parent
        sys.exit(1 if FAILURES else 0)
    if args.device is None:
        import torch

        if not torch.cuda.is_available():
            print(SKIP_LINE)  # noqa: T201
            return
        args.device = "cuda"
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    out = args.out or Path(os.environ.get("OUT") or "gpu-check")
    sys.exit(1 if check(args, out) else 0)


if __name__ == "__main__":
    main()
