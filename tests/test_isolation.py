"""No test touches the user's home, state, cache or data root: conftest gives the session a fake home and points
satcli's variables into a temporary folder, and fails the run if anything lands where it must not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKE_HOME, written_outside

REPO = Path(__file__).resolve().parents[1]
# Tests that train (in-process and through `satcli train`) and caption (through `satcli caption` subprocesses)
# without isolating anything themselves: each would remember its model in the user's state folder.
SLICE = [
    "tests/test_train.py::test_a_second_run_into_the_same_folder_is_refused_without_resume_or_overwrite",
    "tests/test_train.py::test_resume_with_json_and_quiet_continues_the_run",
    "tests/test_scripting.py::test_one_image_piped_prints_its_caption_and_progress_goes_to_the_log",
]


def test_a_slice_of_the_suite_writes_nothing_into_an_empty_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "tmp").mkdir()
    # As a user runs `make test`: their HOME, no XDG or satcli variables; pytest's own folders under TMPDIR.
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("XDG_", "SATCLI_")) and name not in ("MPLCONFIGDIR", "CUDA_CACHE_PATH",
                                                                        "TRITON_CACHE_DIR")}
    env.update(HOME=str(home), TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SLICE], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []  # no remembered model, no cache


def test_the_session_check_names_what_landed_where_it_must_not(tmp_path):
    home, state, repo = tmp_path / "home", tmp_path / "state", tmp_path / "repo"
    for folder in (home, state, repo):
        folder.mkdir()
    (state / "last-model").write_text("/models/mine.pt\n")
    before = {"last-model": b"/models/mine.pt\n"}
    assert written_outside(home, state, before, repo, set(), [tmp_path]) == []
    (home / ".local" / "state" / "satcli").mkdir(parents=True)
    (state / "last-model").write_text(f"{tmp_path}/tiny.pt\n")
    (repo / "captions.parquet").write_bytes(b"")
    assert written_outside(home, state, before, repo, set(), [tmp_path]) == [
        "the home folder gained .local", "the home folder gained .local/state",
        "the home folder gained .local/state/satcli", f"the real state folder {state} now names a test's file",
        "the checkout gained captions.parquet"]


def test_the_session_runs_with_a_fake_home_and_state():
    assert Path.home() == FAKE_HOME and Path(os.environ["HOME"]) == FAKE_HOME
    from satcli.core.defaults import state_dir

    assert FAKE_HOME.parent in state_dir().parents
    assert "SATCLI_MODEL" not in os.environ and "SATCLI_DATA" not in os.environ


def test_the_state_folder_stays_where_linux_users_have_their_remembered_model(tmp_path, monkeypatch):
    """platformdirs chooses the folder per OS; on Linux it is the one satcli always used, so a model remembered
    before keeps working (a guard: this passed before platformdirs too)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the XDG layout is Linux's")
    from satcli.core.defaults import default_model, remember_model, state_dir

    monkeypatch.delenv("SATCLI_STATE_DIR")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir() == tmp_path / ".local" / "state" / "satcli"
    (tmp_path / ".local" / "state" / "satcli").mkdir(parents=True)
    (tmp_path / ".local" / "state" / "satcli" / "last-model").write_text(f"{tmp_path / 'mine.pt'}\n")
    (tmp_path / "mine.pt").write_bytes(b"")
    assert default_model() == tmp_path / "mine.pt"  # written by an earlier satcli, still found
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "satcli"
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "chosen"))
    assert remember_model(tmp_path / "mine.pt") == tmp_path / "chosen" / "last-model"
