"""`make demo` and `make test` on ordinary machines: the Makefile's recipes run with a fake python, pip, id and
apt-get, so what they would install and run is visible without installing anything."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "python $* SATCLI_CHROMIUM=$SATCLI_CHROMIUM" >> "$LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && printf '#!/bin/sh\\necho "satcli $*" >> "$LOG"\\n' > "$3/bin/satcli"
    chmod +x "$3/bin/satcli"
fi
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the Makefile and pyproject, fake tools first on PATH; ``uid`` file sets what ``id -u`` says."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    tools = {"python3": FAKE_PYTHON,
             "id": f'#!/bin/sh\ncat "{tmp_path}/uid"\n',
             "apt-get": '#!/bin/sh\necho "apt-get $*" >> "$LOG"\n'}
    for name, script in tools.items():
        (bin_ / name).write_text(script)
        (bin_ / name).chmod(0o755)
    (tmp_path / "uid").write_text("1000\n")
    return root


def _make(checkout: Path, *args: str, uid: int = 1000, with_apt: bool = True) -> tuple[str, list[str]]:
    tmp = checkout.parent
    (tmp / "uid").write_text(f"{uid}\n")
    if not with_apt:
        (tmp / "bin" / "apt-get").unlink(missing_ok=True)
    log = tmp / "log"
    log.unlink(missing_ok=True)
    make = shutil.which("make")
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "LOG": str(log), "HOME": str(tmp)}
    if not with_apt:  # no apt-get anywhere on PATH (macOS, Fedora): only our bin and the shell's basics
        basics = tmp / "basics"
        basics.mkdir(exist_ok=True)
        for tool in ("sh", "cat", "mkdir", "cp", "chmod", "touch", "printf", "rm"):
            found = shutil.which(tool)
            if found and not (basics / tool).exists():
                os.symlink(found, basics / tool)
        env["PATH"] = f"{tmp / 'bin'}:{basics}"
    done = subprocess.run([make, "--no-print-directory", *args], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, log.read_text().splitlines() if log.exists() else []


def test_demo_installs_only_what_the_demo_needs(checkout):
    _, calls = _make(checkout, "demo")
    installs = [c for c in calls if "pip install" in c and "--upgrade pip" not in c]
    assert installs == ["python -m pip install --quiet -e . SATCLI_CHROMIUM="]  # not '.[dev]'
    assert calls[-1] == "satcli demo"


def test_cpu_only_wheels_through_pip_args(checkout):
    _, calls = _make(checkout, "demo", "PIP_ARGS=--extra-index-url https://download.pytorch.org/whl/cpu")
    assert "python -m pip install --quiet --extra-index-url https://download.pytorch.org/whl/cpu -e . " \
           "SATCLI_CHROMIUM=" in calls


def test_non_root_without_chromium_skips_the_browser_tests_with_one_line(checkout):
    out, calls = _make(checkout, "test", "CHROMIUM=/nonexistent/chromium", uid=1000)
    skipped = [line for line in out.splitlines() if "browser tests skipped" in line]
    assert len(skipped) == 1 and "make test CHROMIUM=/path/to/chromium" in skipped[0]
    assert not any(c.startswith("apt-get") for c in calls)
    assert "python -m pip install --quiet -e .[dev] SATCLI_CHROMIUM=" in calls
    assert calls[-1] == "python -m pytest -q SATCLI_CHROMIUM=/nonexistent/chromium"  # the rest still runs


def test_without_apt_get_even_root_skips_instead_of_failing(checkout):
    out, calls = _make(checkout, "test", "CHROMIUM=/nonexistent/chromium", uid=0, with_apt=False)
    assert "browser tests skipped" in out and calls[-1].startswith("python -m pytest -q")


def test_root_with_apt_installs_chromium_as_ci_does(checkout):
    out, calls = _make(checkout, "test", "CHROMIUM=/nonexistent/chromium", uid=0)
    assert "apt-get install -y -qq --no-install-recommends chromium" in calls
    assert "browser tests skipped" not in out and calls[-1].startswith("python -m pytest -q")


def test_an_existing_chromium_is_used_and_nothing_installed(checkout, tmp_path):
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    out, calls = _make(checkout, "test", f"CHROMIUM={chromium}", "PYTEST_ARGS=-x tests/test_report.py", uid=0)
    assert not any(c.startswith("apt-get") for c in calls) and "browser tests skipped" not in out
    assert calls[-1] == f"python -m pytest -q -x tests/test_report.py SATCLI_CHROMIUM={chromium}"
