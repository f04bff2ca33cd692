"""Attention pictures: the heat lands where the attention is, one GIF frame per word, safe file names."""

import math

import numpy as np
import pytest
from PIL import Image

from satcli.core.errors import SatcliError
from satcli.core.marks import PICTURES_MARK
from satcli.formats.results import CaptionRow
from satcli.pictures.overlays import heat_panel, overlay_name, render_frames, render_sheet, upsample, write_overlays
from tests.helpers import peaked_attention, write_results_file


def _cell_box(row, col, grid_h, grid_w, height, width):
    """The pixel box [y0, y1) × [x0, x1) that grid cell (row, col) covers."""
    return (row * height / grid_h, (row + 1) * height / grid_h, col * width / grid_w, (col + 1) * width / grid_w)


def _assert_peak_in_cell(values: np.ndarray, cell, grid_shape):
    y, x = np.unravel_index(np.argmax(values), values.shape)
    y0, y1, x0, x1 = _cell_box(*cell, *grid_shape, *values.shape)
    assert y0 <= y < y1 and x0 <= x < x1, f"peak at pixel {(y, x)} is not in cell {cell}"


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


@pytest.mark.parametrize(("grid_shape", "size"), [((7, 7), (160, 160)), ((5, 9), (200, 120)), ((14, 14), (97, 131))])
def test_upsampled_heat_peaks_over_the_heaviest_cell(grid_shape, size):
    rng = np.random.default_rng(1)
    cells = [(int(rng.integers(grid_shape[0])), int(rng.integers(grid_shape[1]))) for _ in range(6)]
    cells += [(0, 0), (grid_shape[0] - 1, grid_shape[1] - 1)]  # corners too
    grids = peaked_attention(len(cells), *grid_shape, cells)
    for grid, cell in zip(grids, cells, strict=True):
        heat = upsample(grid, *size)
        assert heat.shape == (size[1], size[0])
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=0.02)
        _assert_peak_in_cell(heat, cell, grid_shape)


def test_heat_is_smooth_not_blocky():
    grid = peaked_attention(1, 7, 7, [(3, 3)])[0]
    heat = upsample(grid, 140, 140)
    # Nearest-neighbour upsampling would give 7 distinct values per row; a smooth one gives many.
    assert len(np.unique(heat[70].round(4))) > 40
    assert np.abs(np.diff(heat, axis=1)).max() < 0.2  # no jumps at cell borders


def test_drawn_panel_is_brightest_over_the_heaviest_cell():
    gray = Image.new("RGB", (150, 110), (128, 128, 128))
    grids = peaked_attention(2, 6, 8, [(1, 6), (4, 1)])
    panels = [np.asarray(heat_panel(gray, g)) for g in grids]
    for panel, cell in zip(panels, [(1, 6), (4, 1)], strict=True):
        assert panel.shape == (110, 150, 3)
        _assert_peak_in_cell(_luminance(panel), cell, (6, 8))
    assert np.abs(panels[0].astype(int) - panels[1]).max() > 100  # two words, two different pictures


def test_sheet_has_a_panel_per_word():
    tokens = ["a", "red", "circle"]
    grids = peaked_attention(3, 7, 7, [(0, 0), (3, 3), (6, 6)])
    one_row = render_sheet(Image.new("RGB", (64, 64), "white"), tokens, grids, panel=100)
    six = render_sheet(Image.new("RGB", (64, 64), "white"), tokens * 2, np.concatenate([grids, grids]), panel=100)
    assert one_row.width >= 4 * 100  # the image and three word panels side by side
    assert six.height > one_row.height  # seven panels wrap onto a second row
    with pytest.raises(ValueError, match="3 tokens but 2"):
        render_sheet(None, tokens, grids[:2])


def test_sheet_writes_each_words_probability_under_its_panel():
    tokens = ["a", "red", "circle"]
    grids = peaked_attention(3, 7, 7, [(0, 0), (3, 3), (6, 6)])
    image = Image.new("RGB", (64, 64), "white")

    def labels(sheet):  # the strip of text under the (single row of) panels
        return np.asarray(sheet)[-46:-8].astype(int)

    def n_red(pixels):  # the probability is written in the highlight colour, the word in black
        return int(((pixels[..., 0] > 150) & (pixels[..., 1] < 120) & (pixels[..., 2] < 100)).sum())

    plain = render_sheet(image, tokens, grids, panel=100)  # a file written before token_logprobs
    sure = render_sheet(image, tokens, grids, panel=100, token_logprobs=[math.log(0.83)] * 3)
    unsure = render_sheet(image, tokens, grids, panel=100, token_logprobs=[math.log(0.12)] * 3)
    assert n_red(labels(plain)) == 0
    assert n_red(labels(sure)) > 30
    assert np.abs(labels(sure) - labels(unsure)).max() > 100  # 0.83 and 0.12 read differently
    assert sure.size == plain.size
    with pytest.raises(ValueError, match="3 tokens but 2 log-probabilities"):
        render_sheet(image, tokens, grids, token_logprobs=[-0.1, -0.2])


def test_animation_moves_the_gaze_word_by_word():
    cells = [(0, 0), (0, 6), (6, 3)]
    frames = render_frames(Image.new("RGB", (200, 200), (128, 128, 128)), ["a", "b", "c"],
                           peaked_attention(3, 7, 7, cells), size=200)
    assert len(frames) == 3
    for frame, cell in zip(frames, cells, strict=True):
        picture = np.asarray(frame)[:200, :200]
        _assert_peak_in_cell(_luminance(picture), cell, (7, 7))


def test_names_are_safe_and_distinct():
    paths = ["a/b.jpg", "a_b.jpg", "../../etc/passwd", "/abs/photo.JPG", "..", "ünï cödé.png", "x" * 500 + ".jpg"]
    names = [overlay_name(p) for p in paths]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) < 100
    assert overlay_name("photos/cat.jpg").startswith("photos_cat-")


def _image(path, colour=(128, 128, 128), size=(96, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_write_overlays_from_a_results_file(tmp_path):
    root = tmp_path / "photos"
    _image(root / "one.png")
    _image(root / "sub" / "two.jpg", size=(64, 96))
    cells = [(1, 1), (5, 5), (2, 6), (6, 0)]
    rows = [
        CaptionRow("one.png", "a b c", ["a", "b", "c"], -2.0, True, peaked_attention(3, 7, 7, cells[:3]), 96, 64),
        CaptionRow("sub/two.jpg", "d", ["d"], -1.0, True, peaked_attention(1, 7, 7, cells[3:]), 64, 96),
        CaptionRow("gone.png", "e f", ["e", "f"], -1.5, True, peaked_attention(2, 7, 7, cells[:2]), 50, 50),
        CaptionRow("broken.jpg", image_width=None, image_height=None, error="not-an-image: cannot identify"),
    ]
    results = write_results_file(tmp_path / "r.parquet", rows)
    summary = write_overlays(results, root, tmp_path / "ov", progress=False)

    assert (summary.n_written, summary.n_errors, summary.n_missing_images) == (3, 1, 1)
    names = sorted(p.name for p in (tmp_path / "ov").iterdir() if p.name != PICTURES_MARK)
    assert names == sorted(f"{overlay_name(r.path)}.{ext}" for r in rows[:3] for ext in ("png", "gif"))
    gif = Image.open(tmp_path / "ov" / f"{overlay_name('one.png')}.gif")
    assert gif.n_frames == 3  # one frame per word
    for t, cell in enumerate(cells[:3]):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB"))
        height = 192 * 64 // 96  # the 96×64 image fitted into the 192-pixel frame
        _assert_peak_in_cell(_luminance(frame[:height, :192]), cell, (7, 7))
    assert Image.open(tmp_path / "ov" / f"{overlay_name('sub/two.jpg')}.gif").n_frames == 1

    limited = write_overlays(results, root, tmp_path / "ov2", limit=1, progress=False)
    assert limited.n_written == 1 and len(list((tmp_path / "ov2").glob("*.png"))) == 1


def test_overlays_find_images_under_the_root_the_file_records(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    _image(root / "one.png")
    rows = [CaptionRow("one.png", "a", ["a"], -1.0, True, peaked_attention(1, 7, 7, [(1, 1)]), 96, 64,
                       token_logprobs=[-0.2])]
    results = write_results_file(tmp_path / "r.parquet", rows, {"satcli.images": {"root": str(root)}})
    monkeypatch.chdir(tmp_path)  # one.png is not in the current directory
    assert write_overlays(results, None, tmp_path / "ov", progress=False).n_missing_images == 0
    assert write_overlays(results, tmp_path, tmp_path / "ov2", progress=False).n_missing_images == 1  # given wins
    root.rename(tmp_path / "moved")  # the recorded folder is gone: back to the current directory
    monkeypatch.chdir(tmp_path / "moved")
    assert write_overlays(results, None, tmp_path / "ov3", progress=False).n_missing_images == 0


def test_write_overlays_refuses_a_file_that_is_no_results(tmp_path):
    bogus = tmp_path / "r.parquet"
    bogus.write_text("not parquet")
    with pytest.raises(SatcliError, match="r.parquet"):
        write_overlays(bogus, tmp_path, tmp_path / "ov", progress=False)


@pytest.fixture(scope="module")
def shapes_and_model(tmp_path_factory):
    """A tiny shapes store (real images on disk) and an untrained tiny captioner on its vocabulary."""
    import torch

    from models.captioner import Captioner
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind, StoredDataset
    from satcli.formats.checkpoint import save_checkpoint
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=4, n_val=2, n_test=3,
                                 image_size=64, min_word_freq=1))
    vocab = StoredDataset.open(root, "shapes").vocab
    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(vocab), image_size=64))
    return root, save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model, vocab)


def test_caption_and_evaluate_draw_overlays(shapes_and_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from satcli.cli import app

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    root, checkpoint = shapes_and_model
    images = root / "shapes" / "source" / "images"
    photos = sorted(images.glob("*.jpg"))[:2]
    runner = CliRunner()
    result = runner.invoke(app, ["caption", *map(str, photos), "--model", str(checkpoint), "-o",
                                 str(tmp_path / "c.parquet"), "--workers", "0", "--max-length", "4",
                                 "--min-length", "2",  # an untrained model may say nothing, and draw nothing
                                 "--root", str(images), "--overlays", str(tmp_path / "ov")])
    assert result.exit_code == 0, result.output
    assert "attention pictures" in result.output and "not found" not in result.output
    assert sorted(p.name for p in (tmp_path / "ov").glob("*.png")) == sorted(
        f"{overlay_name(p.name)}.png" for p in photos)

    result = runner.invoke(app, ["evaluate", "--model", str(checkpoint), "--dataset", "shapes", "--data-root",
                                 str(root), "--max-length", "4", "--min-length", "2", "--out", str(tmp_path / "eval"),
                                 "--overlays", str(tmp_path / "eval-ov")])
    assert result.exit_code == 0, result.output
    drawn = sorted((tmp_path / "eval-ov").glob("*.gif"))
    assert len(drawn) == 3  # every test image, found through the store's source folder
    assert "not found" not in result.output  # drawn over the images, not grey placeholders
