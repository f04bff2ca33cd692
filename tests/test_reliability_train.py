"""Training runs, feature caches and crafted checkpoints under faults (issue 22, part 2).

Each test is what a user would see: the earlier run's files byte-identical, one line naming the path and the
cause, exit code 1. Training here is tiny (16 shapes pictures, a 24-unit decoder, one epoch).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from satcli.cli import app
from satcli.commands.preprocess import run as preprocess
from satcli.data.preprocess import PreprocessOptions
from satcli.data.shapes import JSON_NAME
from satcli.data.store import DatasetKind
from satcli.formats.checkpoint import read_checkpoint
from tests.helpers import one_line_error

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl", "steps.jsonl", "README.md")  # README.md: the model card


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    for name in ("SATCLI_MODEL", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=16, n_val=4, n_test=4,
                                 image_size=64, min_word_freq=1))
    return root


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "shapes", "--data-root", str(root), "--out", str(out), "--epochs", "1",
            "--image-size", "64", "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "24",
            "--dropout", "0", "--batch-size", "16", "--decoder-lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = runner.invoke(app, _train_args(data_root, out))
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() for name in RUN_FILES)
    return out


def _copy_run(trained_run: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out, {name: (out / name).read_bytes() for name in RUN_FILES}


# -- 1. `train --overwrite` with a mistake keeps the trained model ------------------------------------------------


@pytest.mark.parametrize(("mistake", "words"), [
    (("--dataset", "shapez"), ("shapez",)),  # a typo in the dataset name
    (("--device", "cuda:7"), ("cuda:7",)),  # no such GPU (or none at all)
    (("--encoder", "efficientnet-lite9"), ("unknown encoder",)),  # a bad option value
    (("--grid-size", "99"), ("--grid-size 99",)),  # an option the checks refuse
], ids=["dataset", "device", "encoder", "grid"])
def test_overwrite_with_a_mistake_keeps_the_earlier_run(data_root, trained_run, tmp_path, mistake, words):
    out, before = _copy_run(trained_run, tmp_path)
    result = runner.invoke(app, [*_train_args(data_root, out, "--overwrite", "--seed", "1"), *mistake])
    one_line_error(result, *words)
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no temporary file left


def test_overwrite_replaces_the_earlier_run_once_the_new_one_saves(data_root, trained_run, tmp_path):
    out, before = _copy_run(trained_run, tmp_path)
    result = runner.invoke(app, _train_args(data_root, out, "--overwrite", "--seed", "1", "--batch-size", "8"))
    assert result.exit_code == 0, result.output
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        assert (out / name).read_bytes() != before[name], name
    assert read_checkpoint(out / "last.pt")["train_options"]["seed"] == 1
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 10 and [s["step"] for s in steps] == list(range(1, 11))  # 80 captions / 8: the new run's
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


def test_a_loss_that_becomes_nan_stops_the_run_and_saves_nothing(data_root, trained_run, tmp_path):
    out, before = _copy_run(trained_run, tmp_path)
    result = runner.invoke(app, [*_train_args(data_root, out, "--overwrite"), "--decoder-lr", "1e30"])
    one_line_error(result, str(out), "training diverged", "nan")
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, [*_train_args(data_root, fresh), "--decoder-lr", "1e30"])
    one_line_error(result, "training diverged")
    assert not (fresh / "best.pt").exists() and not (fresh / "last.pt").exists()


# -- 2. a full disk while the feature cache is built ---------------------------------------------------------------


def _features_left(root: Path) -> list[str]:
    folder = root / "shapes" / "features"
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _store_copy(data_root: Path, into: Path) -> Path:
    """The preprocessed store without its feature caches (and without the drawn source pictures)."""
    shutil.copytree(data_root / "shapes", into / "shapes", ignore=shutil.ignore_patterns("features", "source"))
    return into


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_leaving(folder: Path, n_free: int) -> None:
    """Fill the file system of ``folder``, then give back ``n_free`` bytes: room for a file's first page (the
    .npy header) but not for the features."""
    with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as caught:
        while True:
            f.write(b"\0" * 4096)
    assert caught.value.errno == errno.ENOSPC
    size = (folder / "filler").stat().st_size
    os.truncate(folder / "filler", size - n_free)


def test_a_real_full_disk_while_caching_features_is_one_line(data_root, tmp_path, small_tmpfs):
    root = _store_copy(data_root, small_tmpfs / "data")
    _fill_leaving(small_tmpfs, 3 * 4096)
    env = {**os.environ, "SATCLI_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "400"}
    done = subprocess.run([sys.executable, "-m", "satcli", *_train_args(root, tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    # before: the features went through a memory map of a sparse file, and the full disk was a bus error (135)
    assert done.returncode == 1, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "train.npy: cannot write (No space left on device, ENOSPC)" in errors[0], done.stderr
    assert [name for name in _features_left(root) if name != "filler"] == []  # nothing half-written is kept
    os.unlink(small_tmpfs / "filler")  # with space again, the same command trains and caches
    done = subprocess.run([sys.executable, "-m", "satcli", *_train_args(root, tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train.npy" in _features_left(root)


def test_no_room_for_the_feature_cache_is_one_line_and_keeps_the_earlier_run(data_root, trained_run, tmp_path,
                                                                             monkeypatch):
    root = _store_copy(data_root, tmp_path / "data")
    out, before = _copy_run(trained_run, tmp_path)

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    result = runner.invoke(app, _train_args(root, out, "--overwrite"))
    one_line_error(result, "train.npy", "No space left on device, ENOSPC")
    assert _features_left(root) == []
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before


# -- 3. a feature-cache array of the wrong shape ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["fewer rows", "other width", "other dtype", "cut short"])
def test_a_cache_array_that_does_not_match_its_description_is_rebuilt(data_root, trained_run, tmp_path, damage,
                                                                      caplog):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (array_path,) = (root / "shapes" / "features").glob("*/train.npy")
    good = np.load(array_path)
    damaged = {"fewer rows": good[:3], "other width": good[:, :, :7], "other dtype": good.astype(np.float32),
               "cut short": None}[damage]
    if damaged is None:
        os.truncate(array_path, array_path.stat().st_size // 2)
    else:
        np.save(array_path, damaged)
    result = runner.invoke(app, _train_args(root, tmp_path / "run"))
    assert result.exit_code == 0, result.output  # before: an IndexError traceback deep inside the first epoch
    assert np.array_equal(np.load(array_path), good)
    if damage != "cut short":
        assert "recomputing" in result.output and "train.npy" in result.output


# -- 5. NaN weights -------------------------------------------------------------------------------------------------


def _picture(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def _edited(source: Path, target: Path, edit) -> Path:
    payload = torch.load(source, weights_only=True)
    edit(payload)
    torch.save(payload, target)
    return target


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(trained_run, tmp_path, value):
    def poison(payload):
        payload["state_dict"]["decoder.out.weight"][3, 5] = value

    model = _edited(trained_run / "best.pt", tmp_path / "nan.pt", poison)
    output = tmp_path / "c.parquet"
    result = runner.invoke(app, ["caption", str(_picture(tmp_path / "photos")), "--model", str(model), "-o",
                                 str(output), "--workers", "0"])
    # before: every caption empty, exit 0
    one_line_error(result, "nan.pt", "not finite numbers", "decoder.out.weight")
    assert not output.exists()
    out, before = _copy_run(trained_run, tmp_path)
    _edited(out / "last.pt", out / "last.pt", poison)
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--out", str(out), "--resume"])
    one_line_error(result, "last.pt", "not finite numbers")


# -- 6. a crafted config that asks for a huge model -----------------------------------------------------------------


def _huge(payload):
    payload["config"].update(vocab_size=65536, embed_dim=65536, attention_dim=65536, decoder_dim=65536)


def test_a_config_asking_for_a_huge_model_allocates_nothing(trained_run, tmp_path):
    import resource

    model = _edited(trained_run / "best.pt", tmp_path / "huge.pt", _huge)
    limit = 8 << 30  # address space: a regression fails to allocate instead of filling the machine's memory

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, "-m", "satcli", "caption", str(_picture(tmp_path / "photos")), "--model", str(model),
               "-o", str(tmp_path / "c.parquet"), "--workers", "0", "--device", "cpu"]  # no CUDA context in 8 GB
    with open(tmp_path / "stderr", "wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "COLUMNS": "400"}, stdout=subprocess.DEVNULL,
                                   stderr=stderr, preexec_fn=limited)
        _, status, usage = os.wait4(process.pid, 0)
    text = (tmp_path / "stderr").read_text()
    assert os.waitstatus_to_exitcode(status) == 1, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    # before: built first (a 17 GB embedding, 69 GB of LSTM), compared after
    assert "huge.pt: checkpoint does not describe a valid model: its config asks for" in errors[0], text
    assert usage.ru_maxrss * 1024 < 2 << 30, f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB"


def test_resume_options_that_do_not_fit_the_weights_are_one_line(data_root, trained_run, tmp_path):
    out, before = _copy_run(trained_run, tmp_path)

    def wider(payload):
        payload["train_state"]["options"]["embed_dim"] = 4096

    _edited(out / "last.pt", out / "last.pt", wider)
    edited = (out / "last.pt").read_bytes()
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data_root),
                                 "--out", str(out), "--resume", "--epochs", "2"])
    one_line_error(result, "last.pt", "its config asks for decoder.embedding.weight of shape")
    assert (out / "last.pt").read_bytes() == edited and (out / "best.pt").read_bytes() == before["best.pt"]


# -- 4. a killed shapes preprocess ---------------------------------------------------------------------------------


def test_a_killed_shapes_preprocess_leaves_nothing_behind_the_next_one(tmp_path):
    root = tmp_path / "data"
    tiny = dict(dataset=DatasetKind.shapes, data_root=root, n_train=4, n_val=2, n_test=2, image_size=64,
                min_word_freq=1)
    preprocess(PreprocessOptions(**tiny))
    (source,) = root.glob("*/source")
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = source.with_name(f".source-partial-{finished.pid}")  # what a SIGKILL mid-draw leaves
        alive = source.with_name(f".source-partial-{running.pid}")  # another preprocess, drawing right now
        for folder in (dead, alive):
            (folder / "images").mkdir(parents=True)
            (folder / "images" / "00001.png").write_bytes(b"\0" * 100_000)
        preprocess(PreprocessOptions(**tiny))  # the source is reused; the dead run's folder goes
        assert not dead.exists()
        assert (alive / "images" / "00001.png").stat().st_size == 100_000
        assert (source / JSON_NAME).is_file()  # and the finished source is still there
    finally:
        running.kill()
        running.wait()
