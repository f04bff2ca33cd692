"""`satcli train --config/--print-config/--dry-run`, `demo --seed` and "did you mean" for store names."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from satcli.cli import app
from satcli.commands import demo as demo_step
from satcli.commands import train as train_step
from satcli.commands.preprocess import run as preprocess
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind

runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=30, n_val=6, n_test=4,
                                 n_heldout=0, image_size=64, min_word_freq=1))
    return root


def test_print_config_round_trips_and_the_command_line_wins(tmp_path, monkeypatch, data_root):
    printed = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data_root), "--epochs", "7",
                                  "--decoder-lr", "0.002", "--feature-shifts", "--print-config"])
    assert printed.exit_code == 0, printed.output
    text = printed.stdout
    assert text.startswith("[train]\n") and "epochs = 7\n" in text and "feature-shifts = true\n" in text
    (tmp_path / "run.toml").write_text(text)
    again = runner.invoke(app, ["train", "--config", str(tmp_path / "run.toml"), "--print-config"])
    assert again.stdout == text  # the file gives back exactly the options it was written from

    seen = []
    monkeypatch.setattr(train_step, "run", lambda options: seen.append(options))
    monkeypatch.setattr("satcli.cli.train_command.print_trained", lambda *a: None)
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "run.toml"), "--epochs", "9"])
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert options.epochs == 9 and options.decoder_lr == 0.002 and options.feature_shifts
    assert options.data_root == data_root  # a path from the file arrives as a Path
    assert {"epochs", "decoder_lr", "feature_shifts"} <= options.given_names()  # from the file counts as given


def test_a_config_with_an_unknown_key_or_bad_toml_is_one_line(tmp_path):
    (tmp_path / "typo.toml").write_text('[train]\ndataset = "shapes"\ndecoder-rl = 0.1\n')
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "typo.toml")])
    assert result.exit_code == 1
    assert "unknown option 'decoder-rl'" in result.output and "did you mean 'decoder-lr'" in result.output
    (tmp_path / "bad.toml").write_text("epochs = = 3\n")
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "bad.toml"), "--dataset", "x"])
    assert result.exit_code == 1 and "not a valid TOML file" in result.output and "bad.toml" in result.output


def test_dry_run_checks_and_sizes_the_run_without_training(tmp_path, data_root):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data_root), "--out", str(out),
                                 "--batch-size", "16", "--epochs", "3", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["n_train_images"] == 30 and plan["n_train_captions"] == 150
    assert plan["steps_per_epoch"] == 10  # ceil(150 / 16)
    assert plan["grid"] == [7, 7] and plan["cache_bytes"] == (30 + 6) * 49 * 192 * 2  # 224 px, stride 32
    assert plan["run_folder"] == "new" and not plan["cache_present"]
    assert not out.exists()  # nothing written
    human = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data_root), "--dry-run"])
    assert "10 steps" not in human.output and "steps (64 captions a step)" in human.output


def test_dry_run_refuses_what_the_run_would_refuse(tmp_path, data_root):
    result = runner.invoke(app, ["train", "--dataset", "shapse", "--data-root", str(data_root), "--dry-run"])
    assert result.exit_code == 1 and "did you mean 'shapes'" in result.output
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data_root), "--dry-run",
                                 "--device", "cuda:7"])
    assert result.exit_code == 1


def test_an_unknown_store_name_lists_or_suggests_the_stores_there(data_root):
    result = runner.invoke(app, ["evaluate", "--dataset", "flickr", "--data-root", str(data_root),
                                 "--model", str(data_root / "none.pt")])
    assert result.exit_code == 1 and "it holds 'shapes'" in result.output


def test_demo_seed_reaches_the_demo(monkeypatch):
    seen = []

    class Done:
        def renderables(self):
            return []

    monkeypatch.setattr(demo_step, "run", lambda options: seen.append(options) or Done())
    result = runner.invoke(app, ["demo", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert seen and seen[0].seed == 7


def _photos(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "raw.cr2").write_bytes(b"raw")
    return folder


def test_caption_dry_run_counts_what_it_finds_and_skips_and_writes_nothing(tmp_path):
    from tests.helpers import picture_sensitive_checkpoint

    model = picture_sensitive_checkpoint(tmp_path)
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "captions.parquet"
    result = runner.invoke(app, ["caption", str(photos), "-m", str(model), "-o", str(out), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["n_images"] == 3 and plan["skipped"] == {".txt": 1, ".cr2": 1}
    assert plan["resume"] == "new output" and plan["model"] == str(model)
    assert not out.exists() and not (tmp_path / "captions.parquet.partial").exists()

    done = runner.invoke(app, ["caption", str(photos / "p0.png"), str(photos / "p1.png"), "-m", str(model), "-o",
                               str(out), "--workers", "0"])
    assert done.exit_code == 0, done.output
    before = out.read_bytes()
    result = runner.invoke(app, ["caption", str(photos), "-m", str(model), "-o", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "3 images; skipped by extension: 1 .cr2, 1 .txt" in result.output
    assert "resume: 2 of 3 images are captioned already" in result.output
    assert out.read_bytes() == before


def test_caption_dry_run_refuses_what_the_run_would_refuse(tmp_path):
    photos = _photos(tmp_path / "photos")
    (tmp_path / "broken.pt").write_text("no")
    result = runner.invoke(app, ["caption", str(photos), "-m", str(tmp_path / "broken.pt"), "--dry-run"])
    assert result.exit_code == 1 and "broken.pt" in result.output and "checkpoint" in result.output
