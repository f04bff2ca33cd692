"""Non-image formats, hostile names and hand-edited results (issue 22, part 2).

Each test is what a user would notice: Ghostscript never runs for an EPS file named ``.jpg``; ``--overlays`` does
a bounded amount of work for any word or path; escape codes and square brackets in names reach the terminal as
visible text; results metadata stays small whatever a checkpoint carries; and hand-edited results files give a
one-line error naming the file and the row, or an error row, never a traceback.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import EpsImagePlugin, Image
from typer.testing import CliRunner

from models.captioner import Captioner
from satcli.cli import app
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import save_checkpoint
from satcli.formats.results import CaptionRow
from tests.helpers import jpeg_bytes, one_line_error, peaked_attention, tiny_config, write_results_file

runner = CliRunner()

# A complete, valid EPS file: Pillow recognises it from its first bytes, whatever its name, and renders it by
# running Ghostscript.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    for name in ("SATCLI_MODEL", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Captioner(tiny_config(image_size=32))
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model, vocab)


def _results_with(tmp_path: Path, rows, name: str = "r.parquet") -> Path:
    return write_results_file(tmp_path / name, rows, {"satcli.images": {"root": str(tmp_path)}})


def _row(path: str, tokens=("a", "b"), **changes) -> CaptionRow:
    values = dict(caption=" ".join(tokens), tokens=list(tokens), sum_logprob=-1.0, finished=True,
                  attention=peaked_attention(len(tokens), 3, 3, [(t % 3, t % 3) for t in range(len(tokens))]),
                  image_width=40, image_height=30)
    values.update(changes)
    return CaptionRow(path, **values)


# -- An EPS file named .jpg: Ghostscript must never run -------------------------------------------------------


@pytest.fixture
def stub_gs(tmp_path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that only leaves a marker file: the marker appearing means Ghostscript was run."""
    marker = tmp_path / "ghostscript-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # Pillow looks for gs once per process and remembers the answer; forget it so this PATH is the one searched.
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


@pytest.fixture
def folder_with_eps(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(jpeg_bytes(rng))
    (folder / "drawing.jpg").write_bytes(EPS)
    return folder


def test_caption_gives_an_eps_file_an_error_row_without_running_ghostscript(folder_with_eps, checkpoint, tmp_path,
                                                                           stub_gs):
    output = tmp_path / "c.parquet"
    result = runner.invoke(app, ["caption", str(folder_with_eps), "--model", str(checkpoint), "-o", str(output),
                                 "--root", str(tmp_path), "--max-length", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in pq.read_table(output).to_pylist()}
    assert not stub_gs.exists(), "Ghostscript was run"
    assert rows["photos/drawing.jpg"]["error"].startswith("not-an-image:")
    assert "JPEG, PNG, WebP, GIF, BMP, TIFF" in rows["photos/drawing.jpg"]["error"]
    assert rows["photos/a.jpg"]["error"] is None and rows["photos/b.jpg"]["error"] is None


def test_report_and_overlays_draw_an_eps_file_grey_without_running_ghostscript(folder_with_eps, tmp_path, stub_gs):
    # A results file that says the EPS file was captioned (written elsewhere, or the file was replaced since).
    results = _results_with(tmp_path, [_row("photos/drawing.jpg"), _row("photos/a.jpg")])
    result = runner.invoke(app, ["report", str(results), "-o", str(tmp_path / "r.html"), "--overlays",
                                 str(tmp_path / "ov")])
    assert result.exit_code == 0, result.output
    assert not stub_gs.exists(), "Ghostscript was run"
    assert "1 image not found" in result.output  # the EPS file, drawn grey like a moved image
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
    assert len(list((tmp_path / "r_files").glob("*.jpg"))) == 1  # a thumbnail for a.jpg only


def test_preprocess_skips_an_eps_file_with_a_warning_without_running_ghostscript(folder_with_eps, tmp_path,
                                                                                stub_gs):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": name, "caption": "a red square"}) + "\n"
                                for name in ("a.jpg", "b.jpg", "drawing.jpg")), encoding="utf-8")
    result = runner.invoke(app, ["preprocess", "--dataset", "captions-csv", "--images", str(folder_with_eps),
                                 "--captions", str(captions), "--data-root", str(tmp_path / "data"), "--name", "m"])
    assert result.exit_code == 0, result.output
    assert not stub_gs.exists(), "Ghostscript was run"
    assert "drawing.jpg" in result.output and "not-an-image" in result.output
    meta = json.loads((tmp_path / "data" / "m" / "meta.json").read_text())
    assert meta["skipped_images"] == {"total": 1, "reasons": {"not-an-image": 1}}


def test_every_image_opener_allows_only_the_listed_formats(tmp_path):
    from satcli.data.images import IMAGE_FORMATS, ImageError, load_image
    from satcli.data.store import StoredDataset
    from satcli.pictures.overlays import open_image

    assert set(IMAGE_FORMATS) == {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    (tmp_path / "x.jpg").write_bytes(EPS)
    with pytest.raises(ImageError, match="not-an-image"):
        load_image(tmp_path / "x.jpg")
    assert open_image(tmp_path / "x.jpg") is None
    with pytest.raises(Exception, match="cannot identify"):
        StoredDataset.decode_image(EPS)
    for fmt in ("PNG", "WEBP", "GIF", "BMP", "TIFF", "JPEG"):  # the allowed ones still open
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, fmt)
        (tmp_path / f"y.{fmt}").write_bytes(buffer.getvalue())
        assert load_image(tmp_path / f"y.{fmt}").image.size == (8, 6)
        assert open_image(tmp_path / f"y.{fmt}").size == (8, 6)


# -- --overlays: bounded work for any word, path or image shape ----------------------------------------------


class _LayoutCounter:
    """Counts the characters Pillow lays out (measured or drawn) and stops a run that lays out more than
    ``budget``: quadratic work is caught in a second, not after minutes."""

    def __init__(self, monkeypatch, budget: int):
        from PIL import ImageFont

        self.chars, self.budget = 0, budget
        for name in ("getbbox", "getlength", "getmask2"):
            original = getattr(ImageFont.FreeTypeFont, name)
            monkeypatch.setattr(ImageFont.FreeTypeFont, name, self._counting(original))

    def _counting(self, original):
        def counted(font, text, *args, **kwargs):
            self.chars += len(text)
            if self.chars > self.budget:
                raise AssertionError(f"over {self.budget:,} characters laid out: the work grows with the text")
            return original(font, text, *args, **kwargs)

        return counted


def test_overlays_work_does_not_grow_with_a_words_or_paths_length(tmp_path, monkeypatch):
    from satcli.pictures.overlays import MAX_COLUMNS, PANEL, write_overlays

    work = {}
    for n in (2_000, 20_000):  # a 20,000-character word took over 5 minutes; a 4,000-character path 79 s
        folder = tmp_path / str(n)
        folder.mkdir()
        path = "d/" * (n // 10) + "photo.jpg"
        results = _results_with(folder, [_row(path, tokens=("a", "b" * n, "c"))])
        counter = _LayoutCounter(monkeypatch, budget=1_000_000)
        summary = write_overlays(results, folder, folder / "ov", progress=False)
        assert summary.n_written == 1
        work[n] = counter.chars
        monkeypatch.undo()
        (sheet,) = summary.files
        with Image.open(sheet) as picture:
            assert picture.width <= MAX_COLUMNS * (PANEL + 8) + 8  # the title and the word were cut, not widened
    assert work[20_000] == work[2_000], work  # bounded: ten times the text, the same work


def test_a_1_by_100000_image_gives_pictures_and_a_report(tmp_path):
    Image.new("RGB", (1, 100_000), (90, 120, 200)).save(tmp_path / "thin.png")
    Image.new("RGB", (100_000, 1), (200, 120, 90)).save(tmp_path / "wide.png")
    results = _results_with(tmp_path, [_row("thin.png", image_width=1, image_height=100_000),
                                       _row("wide.png", image_width=100_000, image_height=1)])
    result = runner.invoke(app, ["report", str(results), "-o", str(tmp_path / "r.html"), "--overlays",
                                 str(tmp_path / "ov")])
    assert result.exit_code == 0, result.output
    assert "not found" not in result.output  # both drawn from their pixels, not grey
    sheets = sorted((tmp_path / "ov").glob("*.png"))
    assert len(sheets) == 2 and len(list((tmp_path / "ov").glob("*.gif"))) == 2
    assert len(list((tmp_path / "r_files").glob("*.jpg"))) == 2


# -- Escape codes and square brackets in names reach the terminal as visible text -----------------------------

ESC = "\x1b"


@pytest.fixture(scope="module")
def escaping_checkpoint(tmp_path_factory) -> Path:
    """A tiny model whose every word carries a terminal escape code (a vocabulary from a hostile caption file)."""
    torch.manual_seed(0)
    model = Captioner(tiny_config(image_size=32))
    words = [f"w{i}{ESC}[2J{ESC}]0;owned\x07" for i in range(model.config.vocab_size - len(SPECIALS))]
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model, Vocabulary([*SPECIALS, *words]))


def _no_raw_controls(text: str) -> None:
    assert ESC not in text and "\x07" not in text and "\x9b" not in text, repr(text)
    assert "Traceback" not in text, text


def test_escape_codes_and_brackets_in_names_are_shown_not_obeyed(tmp_path, escaping_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    names = [f"red{ESC}[31m.jpg", "[old] copy.jpg", "plain.jpg", f"line\nbreak{ESC}[1A.jpg"]
    for name in names:
        (photos / name).write_bytes(jpeg_bytes(rng))
    (photos / "text [bold].jpg").write_text("not an image")  # an error row: printed on stderr
    (tmp_path / "runs[").mkdir()
    output = tmp_path / "runs[" / "x]" / "c.parquet"  # "[/x]" in the path: rich read it as a closing tag
    result = runner.invoke(app, ["caption", str(photos), "--model", str(escaping_checkpoint), "-o", str(output),
                                 "--root", str(tmp_path), "--max-length", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    captions = [c for c in pq.read_table(output).column("caption").to_pylist() if c]
    assert any(ESC in c for c in captions)  # the file keeps the words as they are; only the terminal is spared
    _no_raw_controls(result.output)
    assert "photos/[old] copy.jpg → " in result.output  # brackets kept, not swallowed as a style
    assert "photos/red\\x1b[31m.jpg → " in result.output and "photos/line\\nbreak\\x1b[1A.jpg → " in result.output
    assert "photos/text [bold].jpg: not-an-image" in result.output
    assert "[/x]" in result.output.replace("\n", "")  # the output path in the summary table, as it is


def test_an_error_naming_a_path_with_brackets_or_escapes_is_one_visible_line(tmp_path):
    (tmp_path / "bad[").mkdir()
    for name in ("bad[/x]y.parquet", f"esc{ESC}[2Jape.parquet"):
        path = tmp_path / name
        path.write_text("not parquet")
        result = runner.invoke(app, ["report", str(path)])
        _no_raw_controls(result.output)
        one_line_error(result, "not a readable Parquet file",
                        name.replace(ESC, "\\x1b"))


def test_log_lines_and_the_report_summary_show_escapes_visibly(tmp_path):
    root = tmp_path / f"images{ESC}]0;owned\x07[red]"
    root.mkdir()
    results = _results_with(tmp_path, [_row("moved.jpg")], name=f"r{ESC}[5m[/b].parquet")
    result = runner.invoke(app, ["report", str(results), "--image-root", str(root), "--overlays",
                                 str(tmp_path / "ov[/i]")])
    assert result.exit_code == 0, result.output
    _no_raw_controls(result.output)
    flat = result.output.replace("\n", "")
    assert "images\\x1b]0;owned\\x07[red]" in flat  # the warning naming the image root
    assert "r\\x1b[5m[/b].html" in flat and "ov[/i]" in flat


# -- A checkpoint's metrics copied into every results file: bounded ---------------------------------------------


def _checkpoint_with(folder: Path, **fields) -> Path:
    torch.manual_seed(0)
    model = Captioner(tiny_config(image_size=32))
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    return save_checkpoint(folder / "tiny.pt", model, vocab, **fields)


@pytest.mark.parametrize("field", ["metrics", "train_options"])
def test_a_checkpoint_whose_notes_would_swell_every_results_file_is_refused(tmp_path, field):
    # 9.4 MB as JSON: all of it went into the metadata of every chunk and of the results file (9.7 MB of
    # metadata for one captioned image). A shared string or list inside a pickle can make it far larger than
    # the bytes it adds to the checkpoint.
    notes = {"val_bleu4": 0.2, "history": ["x" * 470] * 20_000}
    checkpoint = _checkpoint_with(tmp_path, **{field: notes})
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(np.random.default_rng(0)))
    output = tmp_path / "c.parquet"
    result = runner.invoke(app, ["caption", str(photos), "--model", str(checkpoint), "-o", str(output),
                                 "--max-length", "4", "--workers", "0"])
    one_line_error(result, "tiny.pt", field, "16,384 characters")
    assert not output.exists()


def test_results_metadata_keeps_the_documented_metrics_and_stays_small(tmp_path):
    from satcli.formats.results import read_metadata

    metrics = {"epoch": 3, "val_split": "val", "val_bleu4": 0.25, "val_cider_d": 0.5}
    checkpoint = _checkpoint_with(tmp_path, metrics=metrics, train_options={"epochs": 3, "dataset": "mine"})
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(np.random.default_rng(0)))
    output = tmp_path / "c.parquet"
    result = runner.invoke(app, ["caption", str(photos), "--model", str(checkpoint), "-o", str(output),
                                 "--max-length", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    model = read_metadata(output)["satcli.model"]
    assert model["metrics"] == metrics and model["train_options"] == {"epochs": 3, "dataset": "mine"}
    assert pq.ParquetFile(output).metadata.serialized_size < 64_000


# -- Hand-edited results: a one-line error naming the file and row, or an error row ---------------------------


def _edited(tmp_path: Path, column: str, values, type_=None) -> Path:
    """A results file of two captioned rows (x.jpg, y.jpg) with ``column`` replaced by ``values``."""
    from satcli.formats.results import SCHEMA, to_table

    table = to_table([_row("x.jpg", token_logprobs=[-0.5, -0.2]), _row("y.jpg", token_logprobs=[-0.1, -0.3])])
    array = pa_array(values, type_ or SCHEMA.field(column).type)
    table = table.set_column(table.schema.get_field_index(column), column, array)
    path = tmp_path / "edited.parquet"
    pq.write_table(table, path)
    return path


def pa_array(values, type_):
    import pyarrow as pa

    return pa.array(values, type_)


def _report_rows(page: Path) -> list[list]:
    text = page.read_text(encoding="utf-8")
    start = text.index('<script id="satcli-data" type="application/json">') + len(
        '<script id="satcli-data" type="application/json">')
    return json.loads(text[start:text.index("</script>", start)])["rows"]


def _report_and_overlays(results: Path, tmp_path: Path):
    page = runner.invoke(app, ["report", str(results), "-o", str(tmp_path / "r.html")])
    pictures = runner.invoke(app, ["report", str(results), "-o", str(tmp_path / "r2.html"), "--overlays",
                                   str(tmp_path / "ov")])
    return page, pictures


@pytest.mark.parametrize("column, values, type_name, words", [
    ("path", [None, "y.jpg"], None, ["row 0 has no path"]),
    ("path", [1, 2], "int64", ["column path holds int64, not string"]),
    ("tokens", [None, ["a", "b"]], None, ["row 0 (x.jpg)", "tokens is null"]),
    ("tokens", [["a", None], ["a", "b"]], None, ["row 0 (x.jpg)", "null word"]),
    ("tokens", [["a", "b"], ["a"]], None, ["row 1 (y.jpg)", "1 words but 2 attention grids"]),
    ("token_logprobs", [[-0.5, -0.2], [-0.1]], None, ["row 1 (y.jpg)", "2 words but 1 token_logprobs"]),
])
def test_hand_edited_results_that_cannot_be_shown_are_one_line(tmp_path, column, values, type_name, words):
    type_ = None if type_name is None else getattr(__import__("pyarrow"), type_name)()
    results = _edited(tmp_path, column, values, type_)
    for result in _report_and_overlays(results, tmp_path):
        one_line_error(result, "edited.parquet", *words)


def test_nan_attention_is_an_error_row_and_the_other_rows_are_drawn(tmp_path):
    grids = peaked_attention(2, 3, 3, [(0, 0), (1, 1)])
    grids[1, 2, 2] = np.nan  # what a model with NaN weights writes
    attention = [[list(map(float, g.reshape(-1))) for g in grids], [list(map(float, g.reshape(-1))) for g in grids]]
    attention[1] = [list(map(float, g.reshape(-1))) for g in peaked_attention(2, 3, 3, [(0, 0), (1, 1)])]
    results = _edited(tmp_path, "attention", attention)
    page, pictures = _report_and_overlays(results, tmp_path)
    assert page.exit_code == 0 and pictures.exit_code == 0, page.output + pictures.output
    assert "(2 images, 1 error)" in page.output
    rows = _report_rows(tmp_path / "r.html")
    assert rows[0][5].startswith("attention holds NaN") and rows[1][5] is None
    assert len(list((tmp_path / "ov").glob("*.png"))) == 1  # y.jpg drawn, x.jpg counted as an error


def test_a_token_logprob_of_1000_is_an_unknown_probability_not_an_overflow(tmp_path):
    from satcli.core.printing import result_records

    results = _edited(tmp_path, "token_logprobs", [[1000.0, -0.2], [float("nan"), float("-inf")]])
    page, pictures = _report_and_overlays(results, tmp_path)
    assert page.exit_code == 0 and pictures.exit_code == 0, page.output + pictures.output
    rows = _report_rows(tmp_path / "r.html")
    assert rows[0][13] == [None, round(float(np.exp(np.float32(-0.2))), 4)] and rows[1][13] == [None, 0.0]
    assert [r["word_probs"][0] for r in result_records(results)] == [None, None]  # caption's --json lines
