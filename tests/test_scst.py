"""Self-critical training: sampling, the CIDEr-D advantage, the policy gradient's direction, the CLI run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import satcli.training.scst
from models.decoding import sample
from satcli.cli import app
from satcli.commands.preprocess import run as preprocess
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind
from satcli.formats.checkpoint import load_captioner, read_checkpoint
from satcli.scoring.metrics import CiderD
from satcli.training import TrainOptions
from satcli.training import train as run
from satcli.training.scst import policy_loss, scst_rewards
from tests.helpers import random_features, tiny_captioner
from tests.test_decoding import END, PAD, START, TRAP, A, B, BigramModel

runner = CliRunner()

REFERENCES = [
    [["a", "red", "square", "left", "of", "a", "blue", "circle"], ["a", "red", "square", "and", "a", "blue", "circle"]],
    [["two", "green", "triangles"], ["a", "pair", "of", "green", "triangles"]],
]
CORPUS = REFERENCES + [[["a", "yellow", "star"]], [["a", "blue", "square", "on", "the", "right"]]]


def test_a_sample_better_than_greedy_gets_a_positive_advantage_and_a_worse_one_negative():
    scorer = CiderD(CORPUS)
    greedy = [["a", "red", "square"], ["two", "green", "triangles"]]
    sampled = [
        [["a", "red", "square", "and", "a", "blue", "circle"], ["a", "yellow", "star"], ["a", "red", "square"]],
        [["a", "blue", "square"], ["two", "green", "triangles"], ["a", "pair", "of", "green", "triangles"]],
    ]
    rewards = scst_rewards(scorer, sampled, greedy, REFERENCES)
    assert rewards.samples.shape == (2, 3) and rewards.greedy.shape == (2,)
    advantage = rewards.advantages
    assert advantage[0, 0] > 0  # a whole reference beats the greedy fragment
    assert advantage[0, 1] < 0  # a caption of another picture is worse
    assert advantage[0, 2] == pytest.approx(0.0)  # the greedy caption itself: no signal
    assert advantage[1, 0] < 0 and advantage[1, 1] == pytest.approx(0.0)
    # the rewards are CIDEr-D of each caption against its own image's references, nothing else
    expected = scorer.scores([sampled[1][2]], [REFERENCES[1]])[0]
    assert rewards.samples[1, 2] == pytest.approx(expected)
    np.testing.assert_allclose(advantage, rewards.samples - rewards.greedy[:, None])


def test_policy_gradient_makes_a_good_sample_likelier_and_a_bad_one_less_likely():
    model = tiny_captioner(vocab_size=12).train()
    features = random_features(model, 1)
    drawn = sample(model, features, n_samples=2, max_length=6)
    before = drawn.logprobs.sum(dim=2).detach()
    loss = policy_loss(drawn.logprobs, torch.tensor([[1.0, -1.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss.backward()
    optimizer.step()
    after = teacher_forced_logprob(model, features, drawn.tokens[0])
    assert after[0] > before[0, 0] and after[1] < before[0, 1]


def teacher_forced_logprob(model, features, tokens):
    """log p of each (n, T) caption, <end> included, computed by teacher forcing."""
    n = tokens.shape[0]
    lengths = ((tokens != PAD).sum(dim=1)).clamp(min=1)
    inputs = torch.cat([torch.full((n, 1), START), tokens], dim=1)
    out = model(features.expand(n, -1, -1), inputs, lengths)
    return out.logprobs.gather(2, tokens.unsqueeze(-1)).squeeze(-1).sum(dim=1)


def test_samples_follow_the_model_and_their_logprobs_are_the_models():
    model = BigramModel(TRAP, n_images=1)
    drawn = sample(model, model.features(), n_samples=4000, max_length=5)
    first = drawn.tokens[0, :, 0]
    assert (first == A).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (first == B).float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert not (drawn.tokens == START).any()
    assert drawn.finished.all()
    # after <end>: pad and no log-probability; before: the table's
    for k in range(20):
        row = drawn.tokens[0, k].tolist()
        end = row.index(END)
        assert all(t == PAD for t in row[end + 1 :])
        assert (drawn.logprobs[0, k, end + 1 :] == 0).all()
        previous = [START, *row[:end]]
        expected = sum(model.table[0, p, w].item() for p, w in zip(previous, row[: end + 1], strict=True))
        assert drawn.logprobs[0, k].sum().item() == pytest.approx(expected, abs=1e-5)


def test_sampling_keeps_the_graph_of_the_real_model():
    model = tiny_captioner().train()
    drawn = sample(model, random_features(model, 2), n_samples=3, max_length=4)
    assert drawn.tokens.shape[:2] == (2, 3) and drawn.logprobs.requires_grad
    drawn.logprobs.sum().backward()
    assert model.decoder.out.weight.grad is not None


# --- the command ------------------------------------------------------------------------------------------------

TINY = dict(image_size=64, embed_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0, batch_size=16,
            val_max_length=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=48, n_val=8, n_test=8,
                                 image_size=64, min_word_freq=1))
    result = run(TrainOptions(dataset="shapes", data_root=root, out=tmp_path_factory.mktemp("xe") / "run",
                              epochs=2, decoder_lr=3e-3, **TINY))
    return root, result.best


def _scst_cli(root: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "shapes", "--data-root", str(root), "--out", str(out), "--scst", "--init",
            str(init), "--epochs", "2", "--batch-size", "16", "--scst-lr", "1e-3", "--scst-samples", "2",
            *extra]


def test_scst_from_the_cli_writes_ordinary_checkpoints(trained, tmp_path, monkeypatch):
    root, init = trained
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    result = runner.invoke(app, _scst_cli(root, init, tmp_path / "scst"))
    assert result.exit_code == 0, result.output
    assert "before SCST: val CIDEr-D" in result.output
    lines = [json.loads(line) for line in (tmp_path / "scst" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[0]["lr"]["decoder"] == pytest.approx(1e-3)  # --scst-lr, not --decoder-lr
    assert all(line["scst"] and np.isfinite(line["val_cider_d"]) and line["greedy_reward"] >= 0 for line in lines)
    loaded = load_captioner(tmp_path / "scst" / "last.pt")
    assert loaded.train_options["scst"] and loaded.train_options["init"] == str(init)
    assert "val_cider_d" in loaded.metrics
    changed = read_checkpoint(tmp_path / "scst" / "last.pt")["state_dict"]
    original = read_checkpoint(init)["state_dict"]
    assert not torch.equal(changed["decoder.out.weight"], original["decoder.out.weight"])
    assert all(torch.equal(changed[k], v) for k, v in original.items() if k.startswith("encoder."))


def test_an_interrupted_scst_run_resumes_to_the_same_model(trained, tmp_path, monkeypatch):
    root, init = trained
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    straight = runner.invoke(app, _scst_cli(root, init, tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output

    real_epoch = satcli.training.scst.scst_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if args[6] == 1:  # the epoch
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(satcli.training.scst, "scst_epoch", dies_in_epoch_2)
    runner.invoke(app, _scst_cli(root, init, tmp_path / "cut"))
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(satcli.training.scst, "scst_epoch", real_epoch)
    # --resume needs neither --scst nor --init: the run folder says what it is
    resumed = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(root),
                                  "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = read_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_scst_needs_a_model_of_the_same_dataset(trained, tmp_path):
    root, init = trained
    no_init = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(root), "--out",
                                  str(tmp_path / "y"), "--scst"])
    assert no_init.exit_code == 1 and "--init" in no_init.output
    payload = read_checkpoint(init)
    payload["vocab"] = [*payload["vocab"][:-1], "zebra"]
    torch.save(payload, tmp_path / "other.pt")
    other = runner.invoke(app, _scst_cli(root, tmp_path / "other.pt", tmp_path / "z"))
    assert other.exit_code == 1 and "vocabulary" in other.output


def test_scst_has_its_own_learning_rate_default_not_cross_entropys():
    from satcli.training.scst import scst_optimizer
    from tests.helpers import tiny_captioner

    options = TrainOptions(dataset="shapes", scst=True)
    assert options.decoder_lr == 4e-4
    assert scst_optimizer(tiny_captioner(), options).param_groups[0]["lr"] == 5e-5
