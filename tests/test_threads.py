"""satcli's torch threads on a shared machine (satcli.core.threads): the policy's decisions from its inputs, the
overrides and their order, and that the commands really run torch with what was chosen. No timing here: the
speeds are bench/shared_machine.py's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from satcli.cli import app
from satcli.commands.preprocess import run as preprocess
from satcli.core import threads as threads_module
from satcli.core.errors import SatcliError
from satcli.core.threads import THREADS_ENV, MachineLoad, ThreadPlan, follow_machine, plan_threads, refresh_threads
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind
from tests.helpers import picture_sensitive_checkpoint

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SATCLI_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _plan(n_cpus: int, n_others: int, torch_default: int | None = None, requested: int | None = None,
          engine: bool = False, **env: str):
    return plan_threads(requested, env, MachineLoad(n_cpus=n_cpus, n_others=n_others), torch_default, engine)


# --- the policy, a function of its inputs --------------------------------------------------------------------


def test_a_quiet_machine_keeps_torchs_default_and_its_spinning():
    plan = _plan(2, 0, torch_default=2)
    assert (plan.n_threads, plan.passive, plan.source) == (2, False, "machine")
    assert "torch's default" in plan.reason


def test_other_work_takes_cpus_away_and_the_waiting_threads_sleep():
    assert _plan(2, 1, torch_default=2).n_threads == 1  # one core left: one thread
    busy = _plan(8, 3, torch_default=8)
    assert (busy.n_threads, busy.passive) == (5, True)
    assert "3 other threads running" in busy.reason and "5 free" in busy.reason
    assert _plan(2, 7, torch_default=2).n_threads == 1  # never fewer than one


def test_the_cpus_this_process_may_use_cap_torchs_default():
    assert _plan(2, 0, torch_default=16).n_threads == 2  # an affinity mask or a quota of 2 CPUs on a big machine
    assert _plan(16, 0, torch_default=4).n_threads == 4  # never more than torch would use itself


def test_other_work_that_fits_beside_torchs_threads_changes_nothing():
    plan = _plan(16, 4, torch_default=8)  # 8 threads of ours and 4 others fit on 16 CPUs
    assert (plan.n_threads, plan.passive) == (8, False)


def test_one_thread_never_asks_for_passive_waiting():
    assert not _plan(2, 5, torch_default=2).passive


# --- overrides and their order -------------------------------------------------------------------------------


def test_the_option_beats_the_environment_which_beats_the_launcher_and_the_machine():
    everything = dict(SATCLI_THREADS="3", OMP_NUM_THREADS="5")
    assert _plan(2, 1, 2, requested=4, **everything).n_threads == 4
    assert _plan(2, 1, 2, requested=4, **everything).source == "--threads"
    assert (_plan(2, 1, 2, **everything).n_threads, _plan(2, 1, 2, **everything).source) == (3, "SATCLI_THREADS")
    assert (_plan(2, 1, 2, OMP_NUM_THREADS="5").n_threads, _plan(2, 1, 2, OMP_NUM_THREADS="5").source) == \
        (5, "OMP_NUM_THREADS")


def test_a_thread_count_set_by_the_user_or_a_launcher_is_respected_whatever_the_load():
    assert _plan(2, 6, 2, OMP_NUM_THREADS="2").n_threads == 2  # not cut to 1 by the busy machine
    assert _plan(8, 0, 8, OMP_NUM_THREADS="1").n_threads == 1  # torchrun / Ray / Spark workers
    assert _plan(8, 0, 8, OMP_NUM_THREADS="4,2").n_threads == 4  # nested levels: the first
    assert _plan(8, 0, 8, MKL_NUM_THREADS="3").source == "MKL_NUM_THREADS"


def test_an_engine_gets_one_thread_per_actor_unless_the_engine_or_user_said_otherwise():
    assert (_plan(8, 0, 8, engine=True).n_threads, _plan(8, 0, 8, engine=True).source) == (1, "engine")
    assert _plan(8, 0, 8, engine=True, OMP_NUM_THREADS="2").n_threads == 2  # Ray's num_cpus=2 actor
    assert _plan(8, 0, 8, engine=True, SATCLI_THREADS="4").n_threads == 4


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_wrong_satcli_threads_is_one_clear_error(value):
    with pytest.raises(SatcliError, match=f"SATCLI_THREADS='{value}' is not a number of threads"):
        _plan(2, 0, 2, SATCLI_THREADS=value)


# --- the commands really run torch with what was chosen -------------------------------------------------------


@pytest.fixture
def torch_threads(monkeypatch):
    """A clean environment and 2 torch threads to start from (so that 1 is a change); restored afterwards."""
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_and_image(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("threads")
    image = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    return picture_sensitive_checkpoint(folder), image


def _caption(model_and_image, tmp_path, *extra: str):
    model, image = model_and_image
    return runner.invoke(app, ["caption", str(image), "--model", str(model), "-o", str(tmp_path / "out.parquet"),
                               "--workers", "0", "--max-length", "4", *extra])


def test_caption_threads_1_runs_torch_with_one_thread(torch_threads, model_and_image, tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    result = _caption(model_and_image, tmp_path, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert "torch threads: 1 (--threads 1" in " ".join(result.output.split())


def test_train_threads_1_runs_torch_with_one_thread(torch_threads, tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=tmp_path, n_train=16, n_val=4, n_test=4,
                                 n_heldout=0, image_size=64, min_word_freq=1))
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(tmp_path), "--out",
                                 str(tmp_path / "run"), "--epochs", "1", "--image-size", "64", "--embed-dim", "8",
                                 "--attention-dim", "8", "--decoder-dim", "8", "--batch-size", "16", "--threads",
                                 "1", "--json"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert (tmp_path / "run" / "best.pt").exists()
    assert "torch threads: 1 (--threads 1" in " ".join(result.output.split())


def test_satcli_threads_sets_the_threads_and_the_option_beats_it(torch_threads, model_and_image, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SATCLI_THREADS", "1")
    assert _caption(model_and_image, tmp_path).exit_code == 0
    assert torch.get_num_threads() == 1
    result = _caption(model_and_image, tmp_path, "--threads", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2


def test_omp_num_threads_set_by_the_user_is_respected(torch_threads, model_and_image, tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = _caption(model_and_image, tmp_path)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS=1 set before satcli started: respected" in " ".join(result.output.split())


def test_a_wrong_satcli_threads_stops_the_command_with_one_red_line(torch_threads, model_and_image, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("SATCLI_THREADS", "lots")
    result = _caption(model_and_image, tmp_path)
    assert result.exit_code == 1
    assert "SATCLI_THREADS='lots' is not a number of threads" in result.output
    assert not (tmp_path / "out.parquet").exists()


# --- the wait policy, which only works before torch loads: in a fresh process ---------------------------------

_FRESH = """
import json, os, sys
from satcli.core.threads import MachineLoad, configure_threads
assert "torch" not in sys.modules
plan = configure_threads(2, load=MachineLoad(n_cpus=2, n_others=1))  # 2 threads asked for on a busy machine
import torch
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
                  "wait": plan.wait}))
"""


def _fresh(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
    done = subprocess.run([sys.executable, "-c", _FRESH], env={**clean, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_busy_machine_makes_waiting_threads_sleep_when_chosen_before_torch_loads():
    fresh = _fresh()
    assert fresh == {"policy": "PASSIVE", "threads": 2, "wait": "sleep (OMP_WAIT_POLICY=PASSIVE)"}


def test_a_wait_policy_set_by_the_user_is_kept():
    fresh = _fresh(OMP_WAIT_POLICY="ACTIVE")
    assert fresh["policy"] == "ACTIVE" and "as set before satcli started" in fresh["wait"]


# --- a long job that looks again ------------------------------------------------------------------------------


def test_refresh_follows_the_machine_but_keeps_a_count_someone_set(torch_threads):
    chosen = ThreadPlan(2, False, "machine", "2 CPUs for this process, 0 other threads running: torch's default")
    busier = refresh_threads(chosen, MachineLoad(n_cpus=2, n_others=1))
    assert busier.n_threads == 1 and torch.get_num_threads() == 1
    assert refresh_threads(busier, MachineLoad(n_cpus=2, n_others=1)) is busier  # nothing changed: nothing done
    torch.set_num_threads(2)
    asked = ThreadPlan(2, False, "--threads", "--threads 2")
    assert refresh_threads(asked, MachineLoad(n_cpus=2, n_others=1)) is asked
    assert torch.get_num_threads() == 2


def test_a_training_that_started_alone_gives_way_when_other_work_arrives(torch_threads, monkeypatch):
    """The headline case: a job that chose 2 spinning threads on a quiet machine, then a second CPU-heavy job
    starts. Between steps it looks again (every REFRESH_SECONDS) and drops to one thread, which never spins against
    the newcomer; when the other job is gone it takes both cores back."""
    torch.set_num_threads(2)
    quiet, busy = MachineLoad(n_cpus=2, n_others=0), MachineLoad(n_cpus=2, n_others=2)
    monkeypatch.setattr(threads_module, "_ACTIVE", [ThreadPlan(2, False, "machine", "quiet at the start")])
    monkeypatch.setattr(threads_module, "_LAST_LOOK", [0.0])
    assert follow_machine(busy, now=1000.0).n_threads == 1 and torch.get_num_threads() == 1
    half = threads_module.REFRESH_SECONDS / 2
    assert follow_machine(quiet, now=1000.0 + half).n_threads == 1  # looked a moment ago: not yet again
    assert follow_machine(quiet, now=1000.0 + threads_module.REFRESH_SECONDS).n_threads == 2
    assert torch.get_num_threads() == 2


def test_the_training_loop_looks_at_the_machine_between_steps(tmp_path, monkeypatch):
    from satcli.training import TrainOptions, supervised, train

    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=tmp_path / "data", n_train=32, n_val=4,
                                 n_test=4, n_heldout=0, image_size=64, min_word_freq=1))
    looks = []
    monkeypatch.setattr(supervised, "follow_machine", lambda: looks.append(1))
    train(TrainOptions(dataset="shapes", data_root=tmp_path / "data", out=tmp_path / "run", epochs=2, image_size=64,
                       embed_dim=8, attention_dim=8, decoder_dim=8, batch_size=40, val_max_length=4))
    n_steps = sum(json.loads(line)["epoch"] > 0 for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines())
    assert len(looks) == n_steps > 0


def test_satcli_threads_and_the_threads_option_are_documented():
    readme = (ROOT / "README.md").read_text()
    assert f"| `{THREADS_ENV}` |" in readme and "--threads N" in readme
    assert "bench/shared_machine.py" in (ROOT / "docs" / "benchmarks.md").read_text()


@pytest.mark.parametrize("command", ["train", "caption", "evaluate", "demo"])
def test_each_heavy_command_takes_threads(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--threads" in result.output


def test_quiet_after_threads_still_silences_the_threads_line(torch_threads, model_and_image, tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    result = _caption(model_and_image, tmp_path, "--threads", "1", "-q")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert result.stderr == ""
