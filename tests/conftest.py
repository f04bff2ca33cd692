import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

# Pin the terminal for rich so CLI output does not depend on the machine running the tests.
os.environ.setdefault("COLUMNS", "120")
os.environ["TERM"] = "dumb"
os.environ.setdefault("NO_COLOR", "1")

# No test may touch the user's home, state, cache or data root. Before anything imports satcli, the whole session
# (and every `satcli` subprocess, which inherits this environment) gets a fake home and satcli's own variables
# point into one temporary folder; pytest_sessionfinish below fails the run if the fake home gained anything or
# the real state folder changed.
REAL_STATE = Path(os.environ.get("SATCLI_STATE_DIR") or platformdirs.user_state_dir("satcli", appauthor=False))
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="satcli-tests-"))
FAKE_HOME = SESSION_ROOT / "home"
FAKE_HOME.mkdir()
os.environ["HOME"] = str(FAKE_HOME)
for _name, _folder in (("XDG_STATE_HOME", ".local/state"), ("XDG_CACHE_HOME", ".cache"),
                       ("XDG_DATA_HOME", ".local/share"), ("XDG_CONFIG_HOME", ".config")):
    os.environ[_name] = str(FAKE_HOME / _folder)
os.environ["SATCLI_STATE_DIR"] = str(SESSION_ROOT / "state")  # where the tests' `satcli train` remember models
# Tools' own caches, outside the fake home so that it stays empty: matplotlib's, and on a GPU CUDA's and Triton's.
for _name in ("MPLCONFIGDIR", "CUDA_CACHE_PATH", "TRITON_CACHE_DIR"):
    os.environ[_name] = str(SESSION_ROOT / _name.lower())
for _name in ("SATCLI_MODEL", "SATCLI_DATA", "SATCLI_PROGRESS_INTERVAL", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
    os.environ.pop(_name, None)


def _files(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


REAL_STATE_BEFORE = _files(REAL_STATE)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.s3 import s3_server  # noqa: E402, F401 — the session's S3 server on 127.0.0.1 (tests/s3.py)

# SATCLI_TEST_DEVICE=cuda: every tensor and module a test makes without naming a device lands there — the CUDA
# pass of the model and decoding tests in bench/gpu_check.py.
if os.environ.get("SATCLI_TEST_DEVICE"):
    torch.set_default_device(os.environ["SATCLI_TEST_DEVICE"])


def pytest_collection_modifyitems(config, items):
    if "engines" not in (config.option.markexpr or ""):  # Ray and Spark start slowly: make test-engines runs them
        skip_engines = pytest.mark.skip(reason="starts Ray or Spark: run with make test-engines (pytest -m engines)")
        for item in items:
            if "engines" in item.keywords:
                item.add_marker(skip_engines)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _loud_console():
    """``-q`` silences satcli's shared console for the rest of the process (one command per process); a test that
    runs ``satcli ... -q`` in-process must not silence the tests after it."""
    yield
    from satcli.core.console import set_quiet

    set_quiet(False)


REPO = Path(__file__).resolve().parents[1]
_REPO_ENTRIES = {p.name for p in REPO.iterdir()} | {".pytest_cache"}


TEMP_FOLDERS = [SESSION_ROOT]  # and pytest's base temporary folder, once known: where this session's files are


@pytest.fixture(scope="session", autouse=True)
def _known_temp_folders(tmp_path_factory):
    TEMP_FOLDERS.append(tmp_path_factory.getbasetemp())


def written_outside(home: Path, real_state: Path, state_before: dict[str, bytes], repo: Path,
                    repo_entries: set[str], temp_folders: list[Path]) -> list[str]:
    """What a test session wrote where it must not: into the fake home, the real state folder, the checkout."""
    # Ray keeps its session token in ~/.ray (the engine tests' local cluster): Ray's own, in the fake home
    problems = [f"the home folder gained {p.relative_to(home)}" for p in sorted(home.rglob("*"))
                if p.relative_to(home).parts[0] != ".ray"][:10]
    # Changed and naming one of this session's files: a test's model (another program's change is no failure).
    after = _files(real_state)
    if any(after.get(name) != content and any(str(t).encode() in after.get(name, b"") for t in temp_folders)
           for name, content in {**after, **state_before}.items()):
        problems.append(f"the real state folder {real_state} now names a test's file")
    problems += [f"the checkout gained {name}" for name in sorted({p.name for p in repo.iterdir()} - repo_entries)]
    return problems


def pytest_sessionfinish(session, exitstatus):
    problems = written_outside(FAKE_HOME, REAL_STATE, REAL_STATE_BEFORE, REPO, _REPO_ENTRIES, TEMP_FOLDERS)
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            if reporter is not None:
                reporter.write_line(f"ISOLATION FAILED: {problem}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
