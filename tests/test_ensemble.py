"""Ensembles: several captioners decode as one, each word from the mean of their word probabilities
(``models.ensemble``), and ``satcli evaluate --ensemble`` scores them."""

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from models.captioner import Captioner
from models.decoding import decode
from models.ensemble import Ensemble
from satcli.cli import app
from satcli.data.store import StoredDataset
from satcli.formats.checkpoint import save_checkpoint
from tests.helpers import one_line_error, random_features, tiny_captioner, tiny_config, tiny_shapes_store

runner = CliRunner()
END = 2


def _members(n: int, **config):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = tiny_captioner(**config).eval()
        with torch.no_grad():  # sharper word distributions than an untrained model's, so members disagree
            for parameter in model.decoder.parameters():
                parameter.mul_(3.0)
        models.append(model)
    return models


@torch.no_grad()
def slow_greedy(members, features, max_length):
    """Greedy decoding written out: each member runs its own LSTM on the words chosen so far, and the next word
    is the argmax of the members' mean probability (its log is the ensemble's log-probability)."""
    captions = []
    for image in features:
        memories = [m.prepare(image[None]) for m in members]
        states = [m.init_state(mem, 1) for m, mem in zip(members, memories, strict=True)]
        token, words, total = 1, [], 0.0
        for _ in range(max_length):
            probs = []
            for i, (member, memory) in enumerate(zip(members, memories, strict=True)):
                logprobs, states[i], _ = member.step(torch.tensor([[token]]), states[i], memory)
                probs.append(logprobs[0, 0].exp())
            mean = torch.stack(probs).mean(0)
            mean[[0, 1, 3]] = 0.0  # <pad>, <start>, <unk> are never written (as the search bans them)
            token = int(mean.argmax())
            total += math.log(float(mean[token]))
            if token == END:
                break
            words.append(token)
        captions.append((words, total))
    return captions


def test_an_ensemble_of_one_model_captions_exactly_as_the_model():
    (model,) = _members(1)
    features = random_features(model, 4)
    alone = decode(model, features, beam_size=3, max_length=10)
    together = decode(Ensemble([model]), features, beam_size=3, max_length=10)
    for a, b in zip(alone, together, strict=True):
        assert a.best.tokens == b.best.tokens
        assert a.best.sum_logprob == pytest.approx(b.best.sum_logprob, abs=1e-5)
        assert torch.allclose(a.attention, b.attention)


def test_each_word_comes_from_the_mean_of_the_members_probabilities():
    members = _members(3)
    torch.manual_seed(5)
    features = random_features(members[0], 5)
    ensemble = Ensemble(members)
    memory = ensemble.prepare(features)
    logprobs, _, alpha = ensemble.step(torch.ones(5, 2, dtype=torch.long), ensemble.init_state(memory, 2), memory)
    probs = []
    for member in members:
        m = member.prepare(features)
        lp, _, _ = member.step(torch.ones(5, 2, dtype=torch.long), member.init_state(m, 2), m)
        probs.append(lp.exp())
    assert torch.allclose(logprobs.exp(), torch.stack(probs).mean(0), atol=1e-6)
    assert torch.allclose(alpha.sum(-1), torch.ones(5, 2), atol=1e-5)  # the mean attention is a distribution

    decoded = decode(ensemble, features, beam_size=1, max_length=12, banned_ids=(3,))
    reference = slow_greedy(members, features, 12)
    assert [r.best.tokens for r in decoded] == [words for words, _ in reference]
    assert [r.best.sum_logprob for r in decoded] == pytest.approx([total for _, total in reference], abs=1e-4)
    singles = [[r.best.tokens for r in decode(m, features, beam_size=1, max_length=12, banned_ids=(3,))]
               for m in members]
    assert any(single != [r.best.tokens for r in decoded] for single in singles)  # the mean is not one member


def test_members_that_cannot_share_features_are_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        Ensemble([tiny_captioner(), tiny_captioner(vocab_size=30)])
    with pytest.raises(ValueError, match="grid_size"):
        Ensemble([tiny_captioner(), tiny_captioner(grid_size=3)])
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return tiny_shapes_store(tmp_path_factory.mktemp("data"))


def _checkpoint(root: Path, folder: Path, seed: int, **config) -> Path:
    vocab = StoredDataset.open(root, "shapes").vocab
    torch.manual_seed(seed)
    model = Captioner(tiny_config(vocab_size=len(vocab), **config), pretrained_encoder=True)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.mul_(3.0)
    return save_checkpoint(folder / f"seed{seed}.pt", model, vocab)


def _evaluate(root: Path, out: Path, model: Path, *ensemble: Path):
    args = ["evaluate", "--model", str(model), "--dataset", "shapes", "--data-root", str(root), "--bleu",
            "--max-length", "8", "--out", str(out), "-q"]
    for path in ensemble:
        args += ["--ensemble", str(path)]
    return runner.invoke(app, args)


def test_evaluate_ensemble_scores_the_members_as_one_and_names_them(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    a = _checkpoint(shapes_root, tmp_path, 0, image_size=64)
    b = _checkpoint(shapes_root, tmp_path, 1, image_size=64)

    def captions(out):
        return pq.read_table(out / "predictions-test-beam3.parquet").column("caption").to_pylist()

    assert _evaluate(shapes_root, tmp_path / "a", a).exit_code == 0
    twice = _evaluate(shapes_root, tmp_path / "aa", a, a)  # the mean of one model's probabilities with themselves
    assert twice.exit_code == 0, twice.output
    assert captions(tmp_path / "aa") == captions(tmp_path / "a")

    both = _evaluate(shapes_root, tmp_path / "ab", a, b)
    assert both.exit_code == 0, both.output
    report = json.loads((tmp_path / "ab" / "report.json").read_text())
    assert report["model"]["path"] == str(a.absolute())
    assert [m["path"] for m in report["model"]["ensemble"]] == [str(b.absolute())]
    assert len(report["model"]["ensemble"][0]["sha256"]) == 64
    assert json.loads((tmp_path / "a" / "report.json").read_text())["model"]["ensemble"] == []

    other_size = _checkpoint(shapes_root, tmp_path, 2, image_size=32)
    one_line_error(_evaluate(shapes_root, tmp_path / "bad", a, other_size), str(other_size), "prepares images")
