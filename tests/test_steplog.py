"""Training you can watch: steps.jsonl beside metrics.jsonl, validation progress, TensorBoard when installed."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from satcli.commands.preprocess import run as preprocess
from satcli.core.errors import SatcliError
from satcli.core.steplog import StepLog
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind
from satcli.training import TrainOptions
from satcli.training import train as run

TINY = dict(image_size=64, embed_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0, batch_size=16,
            decoder_lr=3e-3, val_max_length=12)
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=64, n_val=8, n_test=8,
                                 image_size=64, min_word_freq=1))
    return root


def test_every_step_is_logged_and_averages_to_the_epoch_loss(shapes_root, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "run"
    run(TrainOptions(dataset="shapes", data_root=shapes_root, out=out, epochs=2, **TINY))
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    for line in epochs:
        mine = [s["loss"] for s in steps if s["epoch"] == line["epoch"]]
        assert mine and sum(mine) / len(mine) == pytest.approx(line["loss"], rel=1e-5)
        assert all(s["lr"] == line["lr"] for s in steps if s["epoch"] == line["epoch"])
    assert steps[0]["lr"] == {"decoder": 3e-3}
    # the validation decode reports progress too (stderr is not a terminal here: a line when it finishes)
    assert "validating on val: 8/8 images (100%)" in capfd.readouterr().err


def test_a_resumed_run_drops_the_steps_of_the_epoch_it_trains_again(tmp_path):
    lines = [{"epoch": e, "step": s, "loss": 1.0, "lr": {"decoder": 1e-3}} for e, s in ((1, 1), (1, 2), (2, 3))]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 2, "st')
    log = StepLog(tmp_path, keep_epochs=1)
    log.step(2, 3, torch.tensor(0.5), {"decoder": 1e-3})
    log.close()
    kept = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(k["epoch"], k["step"], k["loss"]) for k in kept] == [(1, 1, 1.0), (1, 2, 1.0), (2, 3, 0.5)]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_writes_event_files(shapes_root, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "run"
    run(TrainOptions(dataset="shapes", data_root=shapes_root, out=out, epochs=1, tensorboard=True, **TINY))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    n_steps = len((out / "steps.jsonl").read_text().splitlines())
    assert len(events.Scalars("train/loss")) == n_steps and events.Scalars("val/val_bleu4")


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed: the event files are tested instead")
def test_tensorboard_missing_is_one_clear_line_before_training(shapes_root, tmp_path):
    with pytest.raises(SatcliError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        run(TrainOptions(dataset="shapes", data_root=shapes_root, out=tmp_path / "run", epochs=1, tensorboard=True,
                         **TINY))
    assert not (tmp_path / "run" / "steps.jsonl").exists()
