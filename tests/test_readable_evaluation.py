"""An evaluation a person can read: evaluate's predictions carry each image's references and own scores, and
``satcli report`` shows them (in headless Chromium, as tests/test_report.py drives it), worst CIDEr-D first, with
``--limit`` keeping only the worst rows of a large file."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from models.captioner import Captioner
from satcli.cli import app
from satcli.commands import evaluate as evaluate_step
from satcli.commands.preprocess import run as preprocess
from satcli.commands.report import run as report
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind, StoredDataset
from satcli.data.text import tokenize
from satcli.formats.checkpoint import save_checkpoint
from satcli.formats.results import SCORE_COLUMNS, CaptionRow, ResultsWriter, to_table
from satcli.formats.results_pick import iter_rows_at, pick_rows
from satcli.pictures.report import ReportOptions
from satcli.scoring.metrics import cider_d
from tests import test_report as report_page
from tests.helpers import peaked_attention, tiny_config, write_results_file

browser, page = report_page.browser, report_page.page  # the Chromium fixtures of the report's own tests
runner = CliRunner()
N_TEST = 6


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    """A real evaluate run at beam sizes 1 and 2 of a tiny untrained captioner (decoder weights doubled so the
    captions vary) on a tiny shapes store."""
    root = tmp_path_factory.mktemp("readable")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root / "data", n_train=16, n_val=4,
                                 n_test=N_TEST, image_size=64, min_word_freq=1))
    store = StoredDataset.open(root / "data", "shapes")
    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(store.vocab), image_size=64), pretrained_encoder=True)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.mul_(2.0)
    checkpoint = save_checkpoint(root / "tiny.pt", model, store.vocab)
    result = evaluate_step.run(evaluate_step.EvaluateOptions(
        dataset="shapes", model=checkpoint, data_root=root / "data", beam_sizes=(1, 2), max_length=8,
        out=root / "eval", device="cpu"))
    return {"store": store, "predictions": [beam.predictions for beam in result.beams]}


def _open(page, html: Path):
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-ready]", timeout=60_000)


def test_predictions_carry_the_references_and_scores_that_average_to_the_corpus_cider_d(evaluated):
    stored = {row["path"]: row for row in evaluated["store"].read("test", ["path", "captions", "objects"]).to_pylist()}
    for predictions in evaluated["predictions"]:
        rows = pq.read_table(predictions).to_pylist()
        assert len(rows) == N_TEST
        assert all(row["references"] == stored[row["path"]]["captions"] for row in rows)  # as the store has them
        references = [[tokenize(c) for c in row["references"]] for row in rows]
        corpus = cider_d(references, [row["tokens"] for row in rows])  # satcli's scorer on the same tokens
        assert sum(row["cider_d"] for row in rows) / len(rows) == pytest.approx(corpus, rel=1e-5)
        assert len({round(row["cider_d"], 4) for row in rows}) > 1  # the images differ: there is a worst one
        assert all(0 <= row["bleu4"] <= 1 for row in rows)
        for row in rows:  # shapes stores its objects with their words: the object columns are filled
            assert row["objects_present"] == sorted({o["label"] for o in stored[row["path"]]["objects"]})
            assert isinstance(row["objects_named"], list)


def test_report_shows_references_and_scores_worst_cider_d_first(evaluated, page, tmp_path):
    predictions = evaluated["predictions"][1]
    rows = pq.read_table(predictions).to_pylist()
    summary = report(ReportOptions(predictions, output=tmp_path / "eval.html", progress=False))
    assert (summary.n_rows, summary.n_missing_images) == (N_TEST, 0)

    _open(page, summary.output)
    assert page.locator("#sort").input_value() == "cider-worst"  # the default for a file with per-image scores
    shown = [float(v) for v in page.locator(".row .scores").evaluate_all("ps => ps.map(p => p.dataset.ciderD)")]
    assert len(shown) == N_TEST
    assert shown[0] == pytest.approx(min(row["cider_d"] for row in rows), abs=1e-4)
    assert shown == sorted(shown)
    first = page.locator(".row").first
    worst = min(rows, key=lambda row: (row["cider_d"], rows.index(row)))
    assert first.locator(".meta").inner_text().startswith(worst["path"])
    assert f"CIDEr-D {worst['cider_d']:.2f}" in first.locator(".scores").inner_text()
    assert f"BLEU-4 {worst['bleu4']:.2f}" in first.locator(".scores").inner_text()
    references = first.locator("details.refs")
    assert not references.locator("li").first.is_visible()  # collapsed under the caption
    references.locator("summary").click()
    assert references.locator("li").all_inner_texts() == worst["references"]
    assert first.locator(".objects").inner_text().startswith("objects named: ")

    page.locator("#sort").select_option("cider-best")
    best = [float(v) for v in page.locator(".row .scores").evaluate_all("ps => ps.map(p => p.dataset.ciderD)")]
    assert best == sorted(shown, reverse=True)
    page.locator("#sort").select_option("file")
    assert page.locator(".row .meta").first.inner_text().startswith(rows[0]["path"])
    page.locator("#search").fill(rows[3]["path"])  # search still works
    page.wait_for_function("document.getElementById('count').textContent.includes('match')", timeout=30_000)
    assert page.locator("#count").inner_text() == f"1 of {N_TEST} images match"
    assert page.errors == []


def test_limit_keeps_the_worst_rows_and_says_so(evaluated, page, tmp_path):
    predictions = evaluated["predictions"][0]
    rows = pq.read_table(predictions).to_pylist()
    html = tmp_path / "worst.html"
    result = runner.invoke(app, ["report", str(predictions), "-o", str(html), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert f"2 of {N_TEST} rows shown" in result.output

    _open(page, html)
    assert page.locator(".row").count() == 2
    assert page.locator("#limited").inner_text().startswith(f"2 of {N_TEST} rows shown")
    shown = sorted(float(v) for v in
                   page.locator(".row .scores").evaluate_all("ps => ps.map(p => p.dataset.ciderD)"))
    lowest = sorted(row["cider_d"] for row in rows)[:2]
    assert shown == pytest.approx(lowest, abs=1e-4)
    assert page.errors == []


def test_a_caption_results_file_reports_as_before_and_limit_takes_its_first_rows(page, tmp_path):
    grids = peaked_attention(2, 4, 4, [(0, 0), (3, 3)])
    rows = [CaptionRow(f"img{i}.png", "a dot", ["a", "dot"], -1.0 - i, True, grids, 40, 30) for i in range(5)]
    results = write_results_file(tmp_path / "captions.parquet", rows)
    table = pq.read_table(results)
    assert all(table.column(name).null_count == 5 for name in SCORE_COLUMNS)  # null in caption results
    older = tmp_path / "older.parquet"  # a file written before the score columns existed
    pq.write_table(table.drop_columns(list(SCORE_COLUMNS)), older)
    summary = report(ReportOptions(older, output=tmp_path / "older.html", progress=False, limit=2))
    assert (summary.n_rows, summary.n_total) == (2, 5)

    _open(page, summary.output)
    assert page.locator("#sort").input_value() == "file"
    assert "CIDEr-D" not in page.locator("#sort").inner_text()  # nothing to sort by
    assert page.locator(".row .meta").all_inner_texts()[0].startswith("img0.png")
    assert [m.split(" ")[0] for m in page.locator(".row .meta").all_inner_texts()] == ["img0.png", "img1.png"]
    assert page.locator(".scores, .refs, .objects").count() == 0
    assert page.locator("#limited").inner_text().startswith("2 of 5 rows shown")
    assert page.errors == []


def test_limit_reads_the_chosen_rows_across_row_groups(tmp_path):
    grids = peaked_attention(1, 2, 2, [(0, 0)])
    scores = [0.9, 0.1, 0.5, None, 0.1, 0.3, 2.0]  # lowest: rows 1 and 4 (a tie, file order), then 5
    rows = [CaptionRow(f"p{i}", "x", ["x"], -1.0, True, grids, 8, 8, cider_d=s) for i, s in enumerate(scores)]
    path = tmp_path / "groups.parquet"
    with ResultsWriter(path, row_group_size=2) as writer:  # four row groups
        writer.write(to_table(rows))
    assert pq.ParquetFile(path).num_row_groups == 4
    assert pick_rows(path, 3) == ([1, 4, 5], True)
    assert pick_rows(path, 6)[0] == [0, 1, 2, 4, 5, 6]  # the row without a score comes last
    assert [(i, row["path"]) for i, row in iter_rows_at(path, ["path", "cider_d"], [5, 1, 4])] == [
        (1, "p1"), (4, "p4"), (5, "p5")]
