import math

import pytest
import torch

from models.captioner import Captioner, CaptionerConfig, caption_loss, doubly_stochastic_penalty
from tests.helpers import caption_batch, random_features, tiny_captioner, tiny_config


def test_forward_shapes_and_no_nan():
    model = tiny_captioner()
    features = random_features(model, 3)
    tokens, lengths = caption_batch([5, 3, 7], 24)
    logprobs, alphas = model(features, tokens, lengths)[:2]
    assert logprobs.shape == (3, 7, 24)
    assert alphas.shape == (3, 7, 49)
    assert torch.isfinite(logprobs).all() and torch.isfinite(alphas).all()
    # real steps are distributions over words and over the grid; padded steps are zero
    assert torch.allclose(logprobs[1, :3].exp().sum(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(alphas[1, :3].sum(-1), torch.ones(3), atol=1e-5)
    assert (logprobs[1, 3:] == 0).all() and (alphas[1, 3:] == 0).all()


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_captioner(dropout=0.3, fine_tune_blocks=1)
    model.train()
    images = torch.randn(2, 3, 64, 64)
    tokens, lengths = caption_batch([4, 6], 24)
    logprobs, alphas = model(model.encode(images), tokens, lengths)[:2]
    loss, _ = caption_loss(logprobs, alphas, tokens, lengths, doubly_stochastic=1.0)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("encoder.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_plain_linear_output_option_trains_too():
    model = tiny_captioner(deep_output=False)
    assert not hasattr(model.decoder, "out_z")
    tokens, lengths = caption_batch([4, 2], 24)
    logprobs, alphas = model(random_features(model, 2), tokens, lengths)[:2]
    caption_loss(logprobs, alphas, tokens, lengths, 1.0)[0].backward()
    assert model.decoder.out.weight.grad is not None


def test_doubly_stochastic_term_matches_hand_computation():
    # 2 captions, 3 steps, 2 pixels; caption 2 has 2 real steps (its third step is padding: zero attention)
    alphas = torch.tensor([
        [[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]],
        [[0.1, 0.9], [0.3, 0.7], [0.0, 0.0]],
    ])
    # caption 1: sums over t = (1.7, 1.3) → ((1-1.7)² + (1-1.3)²) / 2 cells = (0.49 + 0.09) / 2 = 0.29
    # caption 2: sums = (0.4, 1.6) → (0.36 + 0.36) / 2 = 0.36; mean over captions = 0.325
    assert doubly_stochastic_penalty(alphas).item() == pytest.approx(0.325)
    logprobs = torch.full((2, 3, 5), math.log(0.2))
    tokens = torch.tensor([[1, 3, 4, 2], [1, 3, 2, 0]])
    loss, nll = caption_loss(logprobs, alphas, tokens, torch.tensor([3, 2]), doubly_stochastic=2.0)
    assert nll.item() == pytest.approx(-math.log(0.2))
    assert loss.item() == pytest.approx(-math.log(0.2) + 2.0 * 0.325)


def slow_caption_loss(logprobs, alphas, tokens, lengths, lam):
    """The loss written out term by term: the NLL per token (as the tutorial's cross-entropy) plus
    λ · (1/B) Σ_b (1/L) Σ_i (1 - Σ_t α_bti)² (the tutorial's ``alpha_c * ((1 - alphas.sum(1)) ** 2).mean()``)."""
    B, T, L = alphas.shape
    nll_sum, n_tokens = 0.0, 0
    for b in range(B):
        for t in range(int(lengths[b])):
            nll_sum -= float(logprobs[b, t, int(tokens[b, t + 1])])
            n_tokens += 1
    penalty = 0.0
    for b in range(B):
        for i in range(L):
            gaze = sum(float(alphas[b, t, i]) for t in range(int(lengths[b])))
            penalty += (1.0 - gaze) ** 2 / L
    return nll_sum / n_tokens + lam * penalty / B


def test_caption_loss_is_the_formula_written_out_slowly_and_lambda_1_weighs_like_one_token():
    torch.manual_seed(3)
    model = tiny_captioner()
    features = random_features(model, 3)
    tokens, lengths = caption_batch([5, 3, 7], 24)
    with torch.no_grad():
        logprobs, alphas = model(features, tokens, lengths)[:2]
    loss, _ = caption_loss(logprobs, alphas, tokens, lengths, doubly_stochastic=1.0)
    assert loss.item() == pytest.approx(slow_caption_loss(logprobs, alphas, tokens, lengths, 1.0), rel=1e-5)
    # on the 7×7 grid, attention that never moves off one cell costs (T-1)² on that cell and 1 on the other
    # 48, averaged over 49: a few units, the size of the NLL — not the ~28 of a sum over cells
    stuck = torch.zeros(1, 7, 49)
    stuck[0, :, 0] = 1.0
    assert doubly_stochastic_penalty(stuck).item() == pytest.approx((36 + 48) / 49)


def test_padding_does_not_change_the_loss():
    model = tiny_captioner()
    model.eval()
    features = random_features(model, 3)
    tokens, lengths = caption_batch([4, 2, 6], 24)
    padded = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    lp1, al1 = model(features, tokens, lengths)[:2]
    lp2, al2 = model(features, padded, lengths)[:2]
    loss1, _ = caption_loss(lp1, al1, tokens, lengths, 1.0)
    loss2, _ = caption_loss(lp2, al2, padded, lengths, 1.0)
    assert loss1.item() == pytest.approx(loss2.item(), rel=1e-6)
    # and a caption's outputs do not depend on which other captions share its batch
    lp_alone, _ = model(features[1:2], tokens[1:2, :3], lengths[1:2])[:2]
    assert torch.allclose(lp_alone[0], lp1[1, :2], atol=1e-5)


def test_teacher_forcing_equals_stepping_the_decoder():
    model = tiny_captioner()
    model.eval()
    features = random_features(model, 1)
    tokens, lengths = caption_batch([5], 24)
    logprobs, alphas = model(features, tokens, lengths)[:2]
    memory = model.prepare(features)
    state = model.init_state(memory)
    for t in range(5):
        step_logprobs, state, alpha = model.step(tokens[:, t : t + 1], state, memory)
        assert torch.allclose(step_logprobs[0, 0], logprobs[0, t], atol=1e-5)
        assert torch.allclose(alpha[0, 0], alphas[0, t], atol=1e-6)


def test_config_round_trip_and_validation():
    config = tiny_config(grid_size=4)
    assert CaptionerConfig.from_dict({**config.to_dict(), "added_in_a_later_version": 1}) == config
    assert config.image_size == 224  # the encoder's own size by default
    with pytest.raises(ValueError, match="unknown attention"):
        tiny_config(attention="sideways")
    with pytest.raises(ValueError, match="dropout"):
        tiny_config(dropout=1.5)


def test_pooled_grid_is_what_the_model_attends_over():
    model = Captioner(tiny_config(grid_size=3, image_size=96))
    assert model.grid_shape == (3, 3)
    features = model.encode(torch.randn(1, 3, 96, 96))
    assert features.shape == (1, 9, model.encoder.spec.dim)


def test_word_embeddings_start_small_as_in_the_reference_code():
    # N(0, 1) embeddings go straight into the deep output's tanh and saturate it; the tutorial uses U(-0.1, 0.1)
    weight = tiny_captioner().decoder.embedding.weight
    assert weight.abs().max().item() <= 0.1
    assert weight.std().item() > 0.01  # small, not zero
    assert (weight[0] == 0).all()  # the <pad> row
