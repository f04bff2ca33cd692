"""``satcli train --coverage --coverage-loss λ``: coverage attention (See et al. 2017, "Get To The Point"), the
attention that knows where the caption has looked, and the loss on looking there again; the remedies aimed at
captions that name one object twice because the second noun reads the first object again."""

import pytest
import torch

from models.captioner import Captioner, CaptionerConfig, Memory, State, coverage_loss
from models.decoding import DecodingOptions, decode
from satcli.training.options import TrainOptions


def slow_coverage_loss(alphas):
    """Eq. 12 of the paper written out: Σ_t Σ_i min(a_i^t, c_i^t), with c^t = Σ_{t' < t} a^t'."""
    total = 0.0
    B, T, L = alphas.shape
    for b in range(B):
        for t in range(T):
            for i in range(L):
                so_far = sum(float(alphas[b, u, i]) for u in range(t))
                total += min(float(alphas[b, t, i]), so_far)
    return total


def test_the_loss_is_the_paper_s_sum_of_the_overlap_with_the_attention_so_far():
    torch.manual_seed(0)
    alphas = torch.randn(3, 5, 6).softmax(-1)
    alphas[1, 3:] = 0  # padded steps are zero, as Captioner.forward returns them
    assert coverage_loss(alphas).item() == pytest.approx(slow_coverage_loss(alphas), rel=1e-5)
    # looking somewhere new at every step costs nothing; looking at one cell twice costs the second look
    assert coverage_loss(torch.eye(4).unsqueeze(0)).item() == 0.0
    twice = torch.zeros(1, 2, 4)
    twice[0, :, 2] = 1.0
    assert coverage_loss(twice).item() == 1.0


def tiny_model(coverage: bool) -> Captioner:
    torch.manual_seed(0)
    config = CaptionerConfig(vocab_size=12, embed_dim=8, attention_dim=8, decoder_dim=16, coverage=coverage)
    model = Captioner(config)
    model.eval()
    return model


def test_the_attention_reads_the_sum_of_the_earlier_steps_attention():
    """The state carries Σ α of the steps so far; teacher forcing and the step API agree on it."""
    model = tiny_model(coverage=True)
    features = torch.randn(2, 9, model.encoder.spec.dim)
    tokens = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 2, 0, 0]])
    lengths = torch.tensor([4, 2])
    with torch.no_grad():
        forced = model(features, tokens, lengths)
        memory = model.prepare(features)
        state = model.init_state(memory)
        assert state.coverage is not None and state.coverage.abs().sum() == 0
        total = torch.zeros(2, 1, 9)
        for t in range(4):
            logprobs, state, alpha = model.step(tokens[:, t:t + 1], state, memory)
            total += alpha
            torch.testing.assert_close(state.coverage, total)
            for b in range(2):
                if t < lengths[b]:
                    torch.testing.assert_close(alpha[b, 0], forced.alphas[b, t])
                    torch.testing.assert_close(logprobs[b, 0], forced.logprobs[b, t])


def test_the_attention_changes_with_the_coverage_and_learns_its_weight():
    model = tiny_model(coverage=True)
    features = torch.randn(1, 9, model.encoder.spec.dim)
    memory = model.prepare(features)
    h = torch.randn(1, 1, model.config.decoder_dim)
    with torch.no_grad():
        attention = model.decoder.attention  # a learnt aversion to cells already read: w_c against w
        attention.cover.weight.copy_(-3.0 * attention.score.weight.sign().view(-1, 1))
        fresh = model.decoder.attention(memory.keys, memory.features, h, torch.zeros(1, 1, 9))[1]
        looked = torch.zeros(1, 1, 9)
        looked[0, 0, fresh.argmax()] = 1.0
        after = model.decoder.attention(memory.keys, memory.features, h, looked)[1]
    assert after[0, 0, fresh.argmax()] < fresh[0, 0, fresh.argmax()] / 2
    names = [name for name, _ in model.named_parameters()]
    assert "decoder.attention.cover.weight" in names


def test_beam_search_carries_the_coverage_of_each_beam_s_own_history():
    """Each hypothesis of a beam search is what teacher forcing on its own words gives, attention and
    log-probabilities alike: a beam reordered onto its parent must take the parent's coverage with it."""
    model = tiny_model(coverage=True)
    with torch.no_grad():
        model.decoder.attention.cover.weight.mul_(20)  # make the coverage matter to every step's attention
        model.decoder.attention.query.weight.mul_(5)  # a peaked attention that moves with the words written
        model.decoder.out.weight.mul_(8)  # and the untrained model's words vary from beam to beam
        model.decoder.out.bias[model.config.end_id] = -3.0  # with captions of several words
        features = torch.randn(8, 49, model.encoder.spec.dim)
        decoded = decode(model, features, DecodingOptions(beam_size=3, max_length=10, n_best=3))
        checked = 0
        for b, result in enumerate(decoded):
            for hypothesis in result.hypotheses:
                words = list(hypothesis.tokens)
                n = len(words) + (1 if hypothesis.finished else 0)
                tokens = torch.tensor([[model.config.start_id, *words, model.config.end_id][: n + 1]])
                forced = model(features[b:b + 1], tokens, torch.tensor([n]))
                torch.testing.assert_close(hypothesis.attention.flatten(1), forced.alphas[0, :len(words)],
                                           atol=1e-5, rtol=1e-4)
                token_logprobs = forced.logprobs[0].gather(1, tokens[0, 1:].unsqueeze(1)).squeeze(1)
                assert hypothesis.sum_logprob == pytest.approx(float(token_logprobs.sum()), abs=1e-4)
                checked += 1
    assert checked >= 20


def test_without_the_option_the_state_and_the_checkpoint_keys_are_as_before():
    model = tiny_model(coverage=False)
    memory = model.prepare(torch.randn(1, 9, model.encoder.spec.dim))
    state = model.init_state(memory)
    assert state.coverage is None
    assert not any("cover" in name for name in model.state_dict())
    _, state, _ = model.step(torch.ones(1, 1, dtype=torch.long), State(state.h, state.c), Memory(*memory))
    assert state.coverage is None


def test_off_by_default_and_train_options():
    options = TrainOptions(dataset="shapes")
    assert (options.coverage, options.coverage_loss) == (False, 0.0)
    options = TrainOptions(dataset="shapes", coverage=True, coverage_loss=1.0)
    assert options.model_config(20).coverage and options.coverage_loss == 1.0


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from tests.helpers import tiny_shapes_store

    return tiny_shapes_store(tmp_path_factory.mktemp("data"))


def test_train_with_coverage_then_evaluate_and_a_clear_no_from_export(shapes_root, tmp_path, monkeypatch):
    """The whole path a user takes: the options reach the model and the loss, the checkpoint keeps the coverage
    attention (evaluate rebuilds it), and export, which cannot carry its state yet, says so in one line."""
    import json

    from typer.testing import CliRunner

    from satcli.cli import app
    from satcli.formats.checkpoint import read_checkpoint

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(run),
                                  "--image-size", "64", "--embed-dim", "8", "--attention-dim", "8", "--decoder-dim",
                                  "8", "--epochs", "1", "--batch-size", "16", "--coverage", "--coverage-loss", "1",
                                  "-q"])
    assert trained.exit_code == 0, trained.output
    checkpoint = read_checkpoint(run / "best.pt")
    assert checkpoint["config"]["coverage"] is True
    assert "decoder.attention.cover.weight" in checkpoint["state_dict"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
    evaluated = runner.invoke(app, ["evaluate", "--model", str(run / "best.pt"), "--dataset", "shapes",
                                    "--data-root", str(shapes_root), "--bleu", "--max-length", "8", "--out",
                                    str(tmp_path / "scores"), "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "scores" / "predictions-test-beam3.parquet").exists()
    exported = runner.invoke(app, ["export", str(run / "best.pt"), "-o", str(tmp_path / "export")])
    assert exported.exit_code != 0
    assert "--coverage" in exported.output and "best.pt" in exported.output
    assert not (tmp_path / "export").exists()
