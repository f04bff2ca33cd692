"""The user docs say what the code does: checked against the code and against files the code writes."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models.captioner import Captioner
from models.encoders import ENCODERS
from satcli.captioning.options import CaptionOptions
from satcli.cli import app
from satcli.commands.caption import run as caption
from satcli.commands.demo import closing_hint
from satcli.core.defaults import MODEL_ENV, STATE_ENV
from satcli.data.features import cache_bytes
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import save_checkpoint
from satcli.pictures import overlays
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
DOCS = {path.name: path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
runner = CliRunner()


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    """A real caption run of one picture with a tiny model."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = Captioner(tiny_config(image_size=64))
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    checkpoint = save_checkpoint(root / "tiny.pt", model, vocab)
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "grey.png")
    output = root / "captions.parquet"
    caption(CaptionOptions(inputs=(str(root / "grey.png"),), model=checkpoint, output=output, workers=0,
                           root=root, progress=False))
    return output


def test_token_logprobs_and_the_pictures_agree():
    text = DOCS["formats.md"]
    assert "do not store per-word probabilities" not in text  # they do, in token_logprobs
    attention_pictures = text.split("## Attention pictures", 1)[1].split("## HTML report", 1)[0]
    assert "its probability (`exp` of its `token_logprobs` entry" in attention_pictures


def test_overlay_panel_size_and_columns_match_the_code():
    match = re.search(r"one panel per word \((\d+) px a side at most, (\w+) panels a", DOCS["formats.md"])
    assert match and int(match.group(1)) == overlays.PANEL
    assert {"six": 6}[match.group(2)] == overlays.MAX_COLUMNS
    assert f"= {overlays.PANEL} by default" in overlays.__doc__


def test_report_default_image_root_and_thumb_size_are_what_the_cli_says(tmp_path, results_file):
    text = DOCS["formats.md"]
    assert "(report; default:\nthe folder the results file records in `satcli.images`" in text
    help_text = runner.invoke(app, ["report", "-h"]).output
    assert "--thumb-size" in help_text and "--image-root" in help_text
    result = runner.invoke(app, ["report", str(results_file), "-o", str(tmp_path / "r.html"), "--thumb-size", "8"])
    assert result.exit_code == 1 and "--thumb-size must be at least 16, got 8" in result.output
    result = runner.invoke(app, ["report", str(results_file), "-o", str(tmp_path / "r.html"), "--thumb-size", "32"])
    assert result.exit_code == 0, result.output
    (thumb,) = (tmp_path / "r_files").glob("*.jpg")
    assert max(Image.open(thumb).size) <= 32


def test_feature_cache_sizes_in_the_docs_follow_from_the_cache_format(tmp_path):
    text = DOCS["datasets.md"]
    n_images = int(re.search(r"For COCO's ([\d,]+) images", text).group(1).replace(",", ""))
    assert n_images == 123_287  # Karpathy's COCO split: 113,287 + 5,000 + 5,000
    rows = re.findall(r"^\| `([\w-]+)[^|]*\| (\d+)×(\d+) \| ([\d.]+) GB \|$", text, re.M)
    assert len(rows) == 5
    dims = {encoder: ENCODERS[encoder].dim for encoder, *_ in rows}
    for encoder, h, w, gigabytes in rows:
        assert float(gigabytes) == round(cache_bytes(n_images, (int(h), int(w)), dims[encoder]) / 1e9, 1)
    # the formula against a cache file written the way satcli writes it (float16 .npy, memory-mapped)
    array = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.float16, shape=(3, 49, 1280))
    array.flush()
    header = (tmp_path / "train.npy").stat().st_size - cache_bytes(3, (7, 7), 1280)
    assert 0 < header <= 128


def test_feature_cache_format_is_float16_cells_by_dim():
    import satcli.data.features

    assert "float16 array (n_images, n_pixels, dim)" in satcli.data.features.__doc__
    assert "to(torch.float16)" in Path(satcli.data.features.__file__).read_text()


def test_environment_variables_are_documented():
    for name in (MODEL_ENV, STATE_ENV, "SATCLI_DATA", "SATCLI_PROGRESS_INTERVAL"):
        assert f"| `{name}` |" in DOCS["README.md"], name


@pytest.mark.parametrize("name", sorted(DOCS))
def test_user_docs_carry_no_internal_jargon(name):
    text = DOCS[name]
    for pattern in (r"design card", r"\bissue \d+", r"\bissues? #\d+"):
        assert not re.search(pattern, text, re.I), f"{name}: {pattern}"


def test_the_demo_does_not_invite_captioning_real_photos_with_a_shapes_model(tmp_path):
    hint = closing_hint(tmp_path / "best.pt", tmp_path / "shapes" / "images")
    assert "YOUR_PHOTOS" not in hint and "knows only coloured shapes" in hint
    assert f"satcli caption {tmp_path / 'shapes' / 'images'} --model {tmp_path / 'best.pt'}" in hint


def test_the_readme_model_examples_run_as_written(tmp_path, monkeypatch):
    """The README's "A model to inspect, serve and rerun" lines, on a tiny shapes store and model."""
    import shlex
    import subprocess
    import sys

    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind

    block = DOCS["README.md"].split("### A model to inspect, serve and rerun", 1)[1].split("```console", 1)[1]
    lines = [line[2:].split("  #")[0].strip() for line in block.split("```", 1)[0].splitlines()
             if line.startswith("$ ")]
    assert len(lines) == 6
    monkeypatch.chdir(tmp_path)
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=tmp_path / "data", n_train=20, n_val=4,
                                 n_test=4, n_heldout=0, image_size=64, min_word_freq=1, name="flickr8k"))
    torch.manual_seed(0)
    (tmp_path / "runs" / "flickr8k").mkdir(parents=True)
    model = Captioner(tiny_config(image_size=64))
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    save_checkpoint(tmp_path / "runs" / "flickr8k" / "best.pt", model, vocab)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "photo.jpg")
    outputs = []
    for line in lines[:-1]:  # the last one trains
        words = shlex.split(line.replace("> run.toml", "").replace("--dataset flickr8k", "--dataset flickr8k "
                                                                   "--image-size 64 --data-root data"))
        if words[0] == "python":
            done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
            continue
        result = runner.invoke(app, words[1:])
        assert result.exit_code == 0, (line, result.output)
        outputs.append(result.stdout)
        if "--print-config" in line:
            (tmp_path / "run.toml").write_text(result.stdout)
    assert "sha256" in outputs[0] and (tmp_path / "exported" / "step.pt").is_file()
    assert outputs[2].startswith("photo.jpg\t")
    assert "epochs = 20" in outputs[3] and "steps" in runner.invoke(app, shlex.split(lines[4])[1:]).output
