import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from models.captioner import Captioner
from satcli.cli import app
from satcli.commands import evaluate as evaluate_step
from satcli.data.store import StoredDataset
from satcli.data.text import tokenize
from satcli.formats.checkpoint import save_checkpoint
from satcli.formats.results import SCHEMA, read_attention, read_metadata
from satcli.scoring.metrics import bleu
from tests.helpers import tiny_config, tiny_shapes_store

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return tiny_shapes_store(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(shapes_root, tmp_path_factory) -> Path:
    """An untrained tiny captioner on the store's vocabulary, with real encoder weights so captions vary."""
    vocab = StoredDataset.open(shapes_root, "shapes").vocab
    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(vocab), image_size=64), pretrained_encoder=True)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.mul_(2.0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model, vocab)


def test_evaluate_writes_the_report_and_one_results_file_per_beam_size(shapes_root, checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--model", str(checkpoint), "--dataset", "shapes", "--data-root",
                                 str(shapes_root), "--beam-sizes", "1,2", "--bleu", "--coco", "--no-java",
                                 "--grounding", "--max-length", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "BLEU-4 (NLTK)" in result.output and "CIDEr-D" in result.output and "pointing game" in result.output
    assert "METEOR skipped" in result.output and "0–100" in result.output

    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["name"] == "shapes" and report["dataset"]["split"] == "test"
    assert report["dataset"]["n_images"] == 6
    assert report["model"]["path"] == str(checkpoint.absolute())
    assert report["decoding"] == {"beam_sizes": [1, 2], "max_length": 8, "length_penalty": 0.0, "n_best": 1,
                                  "no_repeat_ngram_size": 0, "min_length": 0, "allow_unk": False}
    assert report["satcli_version"] and "no-java" in report["coco"]["skipped"]["meteor"]
    assert [r["beam_size"] for r in report["results"]] == [1, 2]

    store = StoredDataset.open(shapes_root, "shapes")
    stored = store.read("test", ["path", "captions"]).to_pylist()
    references = {row["path"]: [tokenize(c) for c in row["captions"]] for row in stored}
    for entry in report["results"]:
        metrics, grounding = entry["metrics"], entry["grounding"]
        assert set(metrics) >= {"bleu1", "bleu4", "coco_bleu4", "coco_rouge_l", "coco_cider_d"}
        assert "coco_meteor" not in metrics
        assert grounding["n_words"] >= 0 and 0 < grounding["mass_chance"] < 1
        assert grounding["n_peak_words"] > 0 and grounding["peak_uniform"] <= grounding["peak"] <= 1
        table = pq.read_table(out / entry["predictions"])
        assert table.schema.remove_metadata().equals(SCHEMA.remove_metadata())
        rows = table.to_pylist()
        assert sorted(references) == [row["path"] for row in rows]  # every test image once, sorted by path
        assert all(row["error"] is None and row["caption"] == " ".join(row["tokens"]) for row in rows)
        for i, row in enumerate(rows):
            assert read_attention(table, i).shape == (len(row["tokens"]), row["grid_height"], row["grid_width"])
        # the report's BLEU is the BLEU of the captions in the file
        expected = bleu([references[row["path"]] for row in rows], [row["tokens"] for row in rows])
        assert metrics["bleu4"] == pytest.approx(expected["bleu4"])
        metadata = read_metadata(out / entry["predictions"])
        assert metadata["satcli.decoding"]["beam_size"] == entry["beam_size"]
        # report and overlays find the dataset's pictures from anywhere
        assert metadata["satcli.images"]["root"] == store.meta["source"]["images"]
        assert all((Path(metadata["satcli.images"]["root"]) / row["path"]).is_file() for row in rows)
        for row in rows:  # each word's log-probability; with <end>'s they make the caption's
            assert len(row["token_logprobs"]) == len(row["tokens"]) and all(lp <= 0 for lp in row["token_logprobs"])
            assert sum(row["token_logprobs"]) >= row["sum_logprob"] - 1e-4


def test_beam_1_results_are_the_greedy_captions(shapes_root, checkpoint, tmp_path):
    options = evaluate_step.EvaluateOptions(dataset="shapes", model=checkpoint, data_root=shapes_root,
                                            beam_sizes=(1,), max_length=8, out=tmp_path / "a")
    swept = evaluate_step.EvaluateOptions(dataset="shapes", model=checkpoint, data_root=shapes_root,
                                          beam_sizes=(3, 1), max_length=8, out=tmp_path / "b")
    alone, sweep = evaluate_step.run(options), evaluate_step.run(swept)
    assert set(alone.beams[0].metrics) == {"bleu1", "bleu2", "bleu3", "bleu4"}  # BLEU when no metric is named
    one = pq.read_table(alone.beams[0].predictions).column("caption").to_pylist()
    assert pq.read_table(sweep.beams[1].predictions).column("caption").to_pylist() == one


def test_decoding_constraints_and_n_best_reach_the_predictions(shapes_root, checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--model", str(checkpoint), "--dataset", "shapes", "--data-root",
                                 str(shapes_root), "--beam-size", "3", "--n-best", "2", "--no-repeat-ngram", "1",
                                 "--min-length", "3", "--max-length", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["decoding"]["n_best"] == 2 and report["decoding"]["no_repeat_ngram_size"] == 1
    rows = pq.read_table(out / report["results"][0]["predictions"]).to_pylist()
    assert len(rows) == 6  # one row per image, the runner-up beside the best
    for row in rows:
        assert len(row["tokens"]) >= 3 and len(set(row["tokens"])) == len(row["tokens"])
        assert [a["caption"] for a in row["alternatives"]] != [row["caption"]]
        assert len(row["alternatives"]) == 1
    result = runner.invoke(app, ["evaluate", "--model", str(checkpoint), "--dataset", "shapes", "--data-root",
                                 str(shapes_root), "--beam-sizes", "1,3", "--n-best", "2", "--out", str(out)])
    assert result.exit_code == 1 and "n_best" in result.output


def test_cli_wiring_and_bad_input(monkeypatch, tmp_path):
    seen = {}

    def fake_run(options):
        seen["options"] = options
        return evaluate_step.EvaluateResult(tmp_path / "report.json", [], 0)

    monkeypatch.setattr(evaluate_step, "run", fake_run)
    result = runner.invoke(app, ["evaluate", "--dataset", "flickr8k", "--beam-size", "5", "--split", "val"])
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert (options.dataset, options.split, options.beam_sizes, options.coco) == ("flickr8k", "val", (5,), False)
    result = runner.invoke(app, ["evaluate", "--dataset", "x", "--beam-sizes", "1,three"])
    assert result.exit_code == 1 and "--beam-sizes must be whole numbers" in result.output


def test_an_unknown_dataset_is_a_one_line_error(shapes_root, checkpoint, tmp_path):
    result = runner.invoke(app, ["evaluate", "--model", str(checkpoint), "--dataset", "nope", "--data-root",
                                 str(shapes_root)])
    assert result.exit_code == 1 and "no preprocessed dataset 'nope'" in result.output


def test_coco_scores_compare_like_with_like_hyphens_and_unk():
    from satcli.scoring.evaluate import coco_scores
    from satcli.scoring.metrics import coco_metrics

    # the vocabulary spells "t-shirt" as "t shirt": a caption identical to its reference scores as identical
    references = [["a man in a red t-shirt stands on the grass"], ["two dogs run across a wide field"]]
    captions = [["a", "man", "in", "a", "red", "t", "shirt", "stands", "on", "the", "grass"],
                ["two", "dogs", "run", "across", "a", "wide", "field"]]
    assert coco_scores(references, captions, java=False, references="vocabulary").scores["bleu4"] == pytest.approx(1.0)
    # <unk> is one (wrong) word, as it is in the caption: one token of seven, not three
    with_unk = [captions[0], ["two", "<unk>", "run", "across", "a", "wide", "field"]]
    one_wrong_word = [captions[0], ["two", "cats", "run", "across", "a", "wide", "field"]]
    assert coco_scores(references, with_unk, java=False, references="vocabulary").scores == pytest.approx(
        coco_metrics([[" ".join(captions[0])], references[1]], [" ".join(c) for c in one_wrong_word],
                     java=False).scores)
