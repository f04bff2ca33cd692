"""Training runs, feature caches and crafted checkpoints under faults (issue 22, part 2).

Each test is what a user would see: the earlier run's files byte-identical, one line naming the path and the
cause, exit code 1. Training here is tiny (16 shapes pictures, a 24-unit decoder, one epoch).
"""

import errno
import json
import math
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
from satcli.data.store import DatasetKind
from satcli.formats.checkpoint import read_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl", "steps.jsonl")


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


def _one_line_error(result, *words: str) -> None:
    """Exit 1 and a single error line naming every one of ``words``; no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], result.output


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
    _one_line_error(result, *words)
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
    _one_line_error(result, str(out), "training diverged", "nan")
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, [*_train_args(data_root, fresh), "--decoder-lr", "1e30"])
    _one_line_error(result, "training diverged")
    assert not (fresh / "best.pt").exists() and not (fresh / "last.pt").exists()
