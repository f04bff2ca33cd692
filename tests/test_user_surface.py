"""What a user notices at the surface: reruns into one output keep every row, ``-o -``, the n-best captions
everywhere they are asked for, progress and log lines, ``-q``, the report's words for broken files, training
refusals and notes, the README's exit codes, a clean ``pip install``, and plurals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.text import Text
from typer.testing import CliRunner

import satcli
from satcli.captioning.options import CaptionOptions
from satcli.cli import app
from satcli.commands.caption import run as caption
from satcli.commands.demo import closing_hint
from satcli.commands.preprocess import run as preprocess
from satcli.commands.report import run as report
from satcli.core.console import console
from satcli.core.errors import SatcliError
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind
from satcli.formats.results import CaptionRow
from satcli.pictures.report import ReportOptions
from tests.helpers import peaked_attention, picture_sensitive_checkpoint, write_results_file

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
LONG = "a-folder-name-long-enough-that-one-path-is-wider-than-the-terminal-of-a-log-file-" * 2


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_PROGRESS_INTERVAL", raising=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return picture_sensitive_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / name)
    return root


def _caption_cli(*args: str, env: dict | None = None):
    return runner.invoke(app, ["caption", *args, "--workers", "0", "--max-length", "5"], env=env)


# -- 2. reruns into the same output; -o - ----------------------------------------------------------------------


def test_two_single_image_runs_into_the_default_output_keep_both_rows(model, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _caption_cli(str(photos / "a.png"), "--model", str(model), "--root", str(photos))
    assert first.exit_code == 0, first.output
    second = _caption_cli(str(photos / "b.png"), "--model", str(model), "--root", str(photos))
    assert second.exit_code == 0, second.output
    assert pq.read_table(tmp_path / "captions.parquet").column("path").to_pylist() == ["a.png", "b.png"]
    assert "Keeping the 1 earlier row of captions.parquet" in second.stderr
    assert re.search(r"earlier rows kept\W+1\b", second.stderr) and re.search(r"captioned\W+1\b", second.stderr)
    rows = {r["path"]: r["caption"] for r in pq.read_table(tmp_path / "captions.parquet").to_pylist()}
    assert second.stdout == rows["b.png"] + "\n"  # this run's image only, not the earlier one
    assert "Captioning 1 image with" in second.stderr  # not "1 images"


def test_a_rerun_with_other_options_into_an_existing_output_is_refused_in_one_line(model, photos, tmp_path):
    output = tmp_path / "captions.parquet"
    options = CaptionOptions(inputs=(str(photos / "a.png"),), model=model, output=output, root=photos, workers=0,
                             max_length=5, progress=False)
    caption(options)
    before = output.read_bytes()
    with pytest.raises(SatcliError, match="beam_size 3 → 1.*--overwrite"):
        caption(CaptionOptions(**{**options.__dict__, "inputs": (str(photos / "b.png"),), "beam_size": 1}))
    assert output.read_bytes() == before


def test_dash_o_dash_is_refused_and_points_to_json(model, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _caption_cli(str(photos / "a.png"), "--model", str(model), "-o", "-")
    assert result.exit_code == 1
    assert "--json" in result.output and "'-'" in result.output
    assert not (tmp_path / "-").exists()


# -- 3. n_best everywhere it is accepted ------------------------------------------------------------------------


def test_n_best_alternatives_reach_the_api_json_lines_and_report(model, photos, tmp_path, monkeypatch):
    (api_row,) = satcli.load(model).caption(photos / "a.png", beam_size=3, n_best=3, max_length=5)
    assert len(api_row["alternatives"]) == 2
    assert set(api_row["alternatives"][0]) == {"caption", "sum_logprob", "finished"}
    assert api_row["alternatives"][0]["sum_logprob"] <= api_row["sum_logprob"]
    (plain,) = satcli.load(model).caption(photos / "a.png", max_length=5)
    assert plain["alternatives"] is None

    monkeypatch.chdir(tmp_path)
    result = _caption_cli(str(photos / "a.png"), "--model", str(model), "--root", str(photos), "--n-best", "3",
                          "--json")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert [a["caption"] for a in line["alternatives"]] == [a["caption"] for a in api_row["alternatives"]]

    report(ReportOptions(tmp_path / "captions.parquet", tmp_path / "report.html", image_root=photos,
                         progress=False))
    (row,) = _page_rows(tmp_path / "report.html")
    assert [caption for caption, _ in row[14]] == [a["caption"] for a in api_row["alternatives"]]


def _page_rows(page: Path) -> list:
    data = re.search(r'<script id="satcli-data" type="application/json">(.*?)</script>', page.read_text(), re.S)
    return json.loads(data.group(1))["rows"]


# -- 5. the report says what is wrong with a file that is there -------------------------------------------------


def test_the_report_names_what_is_wrong_instead_of_image_not_found(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.jpg").write_text("not a picture")
    (photos / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    grids = peaked_attention(2, 3, 3, [(0, 0), (1, 1)])
    rows = [CaptionRow("cut.jpg", error="truncated: truncated or corrupt image data (broken data stream)"),
            CaptionRow("empty.jpg", error="empty: the file is empty (0 bytes)"),
            CaptionRow("gone.png", "a cat", ["a", "cat"], -1.0, True, grids, 30, 30),
            CaptionRow("notes.jpg", error="not-an-image: not an image file Pillow can read")]
    write_results_file(tmp_path / "r.parquet", rows)
    report(ReportOptions(tmp_path / "r.parquet", tmp_path / "r.html", image_root=photos, progress=False))
    notes = {row[0]: row[15] for row in _page_rows(tmp_path / "r.html")}
    assert notes == {"cut.jpg": "truncated or corrupt image", "empty.jpg": "empty file",
                     "gone.png": "image not found", "notes.jpg": "not an image"}
    assert "r[NOTE]" in (tmp_path / "r.html").read_text()  # the page draws the note where the picture would be


# -- 4. progress and log lines, -q --------------------------------------------------------------------------------


def test_log_lines_and_hints_do_not_wrap_when_stderr_is_a_file(model, photos, tmp_path, monkeypatch, capsys):
    folder = tmp_path / LONG
    folder.mkdir()
    shutil.copy(model, folder / "model.pt")
    monkeypatch.chdir(tmp_path)
    result = _caption_cli(str(photos / "a.png"), "--model", str(folder / "model.pt"))
    assert result.exit_code == 0, result.output
    assert f"Captioning 1 image with {folder / 'model.pt'} on cpu" in result.stderr  # one line, copyable
    console.print(Text(closing_hint(folder / "best.pt", folder / "images")))
    hint = capsys.readouterr().err
    assert f"next:     satcli caption {folder / 'images'} --model {folder / 'best.pt'} -o shapes.parquet" in hint


def test_ctrl_c_in_a_terminal_puts_the_warning_on_its_own_line(model, tmp_path):
    pty, termios, fcntl = (pytest.importorskip(name) for name in ("pty", "termios", "fcntl"))
    rng = np.random.default_rng(1)
    (tmp_path / "pics").mkdir()
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "pics" / f"{i:03d}.png")
    master, terminal = pty.openpty()

    def own_terminal():  # a session whose controlling terminal is the pty, as in a shell: ^C becomes SIGINT
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # and SIGINT's default action, as a shell gives its foreground job: a test run started in the background
        # (`make test &`, nohup) ignores SIGINT, and the child would inherit that and never see the Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "satcli", "caption", "pics", "--model", str(model),
                                "--batch-size", "2", "--workers", "0"], stdin=terminal, stdout=terminal,
                               stderr=terminal, env=env, cwd=tmp_path, preexec_fn=own_terminal)
    os.close(terminal)
    seen, sent = b"", False
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child is gone and the terminal closed
            break
        if not data:
            break
        seen += data
        if not sent and seen.count(b"images/s") >= 3:  # the bar is up and moving: press Ctrl-C
            os.write(master, b"\x03")
            sent = True
    process.wait(timeout=300)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))
    assert sent and process.returncode != 0, text[-2000:]
    assert re.search(r"[\r\n]WARNING +Interrupted: ", text), text[-2000:]  # not glued onto the bar's "^C"


def test_encoders_takes_dash_q():
    result = runner.invoke(app, ["encoders", "-q"])
    assert result.exit_code == 0, result.output
    assert "efficientnet-lite0" in result.stdout


# -- 4 and 5. training: the loss from the first step, a missing val split, resuming a finished run ---------------

TINY = ["--image-size", "64", "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "24", "--dropout", "0",
        "--batch-size", "16", "--decoder-lr", "3e-3"]


def _shapes(root: Path, **splits) -> Path:
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, image_size=64, min_word_freq=1,
                                 **{"n_train": 40, "n_val": 6, "n_test": 6, "n_heldout": 0, **splits}))
    return root


def test_progress_lines_carry_the_loss_and_a_finished_run_says_how_to_train_longer(tmp_path):
    root = _shapes(tmp_path / "data")
    train = ["train", "--dataset", "shapes", "--data-root", str(root), "--out", str(tmp_path / "run"), *TINY]
    done = runner.invoke(app, [*train, "--epochs", "1"], env={"SATCLI_PROGRESS_INTERVAL": "0"})
    assert done.exit_code == 0, done.output
    steps = [line for line in done.stderr.splitlines() if line.startswith("epoch 1/1: ")]
    assert steps and all(re.search(r", loss \d+\.\d{3}$", line) for line in steps), steps
    assert "nan" not in done.stderr

    again = runner.invoke(app, [*train, "--epochs", "1", "--resume"])
    assert again.exit_code == 0, again.output
    assert "resuming" not in again.stderr
    assert "the run is finished (1 of 1 epochs trained)" in again.stderr and "--epochs 11" in again.stderr


def test_ctrl_c_in_training_says_what_last_pt_holds(tmp_path, monkeypatch):
    import satcli.training.supervised

    root = _shapes(tmp_path / "data")
    real_epoch = satcli.training.supervised.Supervised.epoch

    def epoch(self, number):
        if number == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second epoch
        return real_epoch(self, number)

    monkeypatch.setattr(satcli.training.supervised.Supervised, "epoch", epoch)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(root), "--out", str(out),
                                 "--epochs", "3", *TINY])
    assert result.exit_code != 0
    assert f"Interrupted: {out / 'last.pt'} holds epoch 1; add --resume to the same command" in result.stderr


def test_a_dataset_without_val_or_test_split_is_refused_before_feature_caching(tmp_path):
    root = _shapes(tmp_path / "data", n_val=0, n_test=0)
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(root), "--out",
                                 str(tmp_path / "run"), "--epochs", "1", *TINY])
    assert result.exit_code == 1
    assert "no 'val' or 'test' split to validate on" in result.output and "it has: train" in result.output
    assert not (root / "shapes" / "features").exists()  # refused before caching the training features


# -- 5. the README's exit codes, a clean install ---------------------------------------------------------------


def test_the_readme_gives_the_exit_codes_the_cli_returns(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "exits\n  with 1" in readme or "exits with 1" in readme
    usage = runner.invoke(app, ["caption", "x.jpg", "--beam-size", "0"])
    assert usage.exit_code == 2 and re.search(r"mistyped command line[^.]*exits with 2", readme)
    data = runner.invoke(app, ["caption", str(tmp_path / "nope.jpg"), "--model", str(tmp_path / "m.pt")])
    assert data.exit_code == 1


def test_building_the_package_prints_no_licence_deprecation(tmp_path):
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "meta").mkdir()
    code = "from setuptools import build_meta as b; b.prepare_metadata_for_build_editable('meta')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Deprecat" not in done.stderr and "Deprecat" not in done.stdout
    (metadata,) = (tmp_path / "meta").glob("*.dist-info/METADATA")
    assert "License-Expression: MIT" in metadata.read_text()
