"""bench/gpu_check.py: one line and exit 0 without a GPU; on a CPU its quick dry run goes through every step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gpu_check(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_cuda_the_check_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "out"
    done = _gpu_check(env={"CUDA_VISIBLE_DEVICES": "", "OUT": str(out)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and "no CUDA GPU" in done.stdout
    assert not out.exists()  # nothing ran, nothing written


@pytest.mark.slow
def test_quick_dry_run_on_the_cpu_writes_every_step_into_one_folder(tmp_path):
    """The steps most likely to break on a first GPU call (paths, options, imports), at tiny sizes on the CPU."""
    out = tmp_path / "out"
    done = _gpu_check("--device", "cpu", "--quick", "--steps", "env,decode,caption", "--budget", "900",
                      "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check.md"]
    report = (out / "gpu_check.md").read_text()
    for step in ("env", "decode", "caption"):
        assert f"## {step}: ok" in report, report
    assert "| efficientnet-lite0 224px | 8 | 1 |" in report  # the caption table's row
    assert "(a′)" in report and "images/s" in report  # the variant table and the decode table
