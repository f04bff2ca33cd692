"""Stochastic hard attention: an unbiased gradient estimator, soft half, no NaN, same decoding, round trip."""

import itertools

import pytest
import torch

from models.captioner import Captioner, caption_loss, hard_attention_loss
from models.decoding import decode
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import load_captioner, save_checkpoint
from tests.helpers import caption_batch, random_features, tiny_config


def hard_captioner(**overrides) -> Captioner:
    return Captioner(tiny_config(attention="hard", **overrides))


def attention_parameters(model: Captioner) -> list[torch.nn.Parameter]:
    """The parameters that reach the loss only through α when locations are sampled."""
    attention = model.decoder.attention
    return [attention.key.weight, attention.query.weight, attention.score.weight]


def flat_grad(loss: torch.Tensor, parameters) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])


def test_reinforce_gradient_is_unbiased_on_a_two_step_toy_problem():
    # 2×2 grid, captions of two steps: 16 location sequences, few enough to take the expectation exactly.
    model = hard_captioner(grid_size=2, hard_sample_prob=1.0, hard_entropy=0.0).train()
    with torch.no_grad():
        model.decoder.attention.score.weight.mul_(4.0)  # a non-uniform α, so there is a gradient to find
    features = random_features(model, 1)
    tokens, lengths = caption_batch([2], 24)
    params = attention_parameters(model)

    # Exact: E[nll] = Σ_seq p(seq) nll(seq); nll(seq) does not depend on these parameters (the context read is
    # the sampled feature vector), so ∇E = Σ_seq nll(seq) ∇p(seq).
    sequences = torch.tensor(list(itertools.product(range(4), repeat=2)))  # (16, 2)
    forced = iter(sequences.unbind(1))
    model.decoder.attention.sample = lambda log_alpha: next(forced).view(-1, 1)
    out = model(features.expand(16, -1, -1), tokens.expand(16, -1), lengths.expand(16))
    del model.decoder.attention.sample
    nll = -out.logprobs.gather(2, tokens[:, 1:3].expand(16, -1).unsqueeze(-1)).squeeze(-1).sum(1)
    p = out.location_logprob.exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    exact = flat_grad((p * nll.detach()).sum(), params)

    # Monte Carlo: the mean of the REINFORCE surrogate's gradient over many sampled captions. Any baseline fixed
    # before sampling keeps it unbiased; one near the mean reward (as the moving average is) keeps it precise.
    n = 20_000
    mean_reward = -(p * nll).sum().item()  # E[log p(y | s, a)]: what the moving average tracks
    model.reward_baseline.fill_(mean_reward)
    model.reward_baseline_updates.fill_(1)
    out = model(features.expand(n, -1, -1), tokens.expand(n, -1), lengths.expand(n))
    assert out.sampled.all()
    estimate = flat_grad(hard_attention_loss(model, out, tokens.expand(n, -1), update_baseline=False) / n, params)

    error = (estimate - exact).norm() / exact.norm()
    assert error < 0.05, f"relative error {error:.3f}"
    assert torch.nn.functional.cosine_similarity(estimate, exact, dim=0) > 0.998
    assert model.reward_baseline.item() == pytest.approx(mean_reward)  # update_baseline=False leaves it alone


def test_the_moving_average_baseline_starts_at_the_first_batch_and_then_averages():
    model = hard_captioner(hard_sample_prob=1.0, hard_baseline_decay=0.9).train()
    tokens, lengths = caption_batch([4, 6, 3], 24)
    out = model(random_features(model, 3), tokens, lengths)
    reward = out.logprobs.gather(2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).sum(1).detach()
    hard_attention_loss(model, out, tokens)
    assert model.reward_baseline.item() == pytest.approx(reward.mean().item(), rel=1e-5)
    first = model.reward_baseline.item()
    out = model(random_features(model, 3), tokens, lengths)
    reward = out.logprobs.gather(2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).sum(1).detach()
    hard_attention_loss(model, out, tokens)
    assert model.reward_baseline.item() == pytest.approx(0.9 * first + 0.1 * reward.mean().item(), rel=1e-5)
    assert model.reward_baseline_updates.item() == 2


def test_about_half_the_captions_sample_and_the_others_read_the_expectation():
    torch.manual_seed(1)
    model = hard_captioner().train()
    features = random_features(model, 400)
    tokens, lengths = caption_batch([5] * 400, 24)
    out = model(features, tokens, lengths)
    assert 0.4 < out.sampled.float().mean().item() < 0.6
    assert (out.location_logprob[~out.sampled] == 0).all()
    assert (out.location_logprob[out.sampled] < 0).all()
    # a caption that reads the expectation gets exactly what the soft model computes with the same weights
    soft = Captioner(tiny_config())
    soft.load_state_dict(model.state_dict(), strict=False)
    soft_logprobs = soft(features, tokens, lengths).logprobs
    expected = ~out.sampled
    assert torch.allclose(out.logprobs[expected], soft_logprobs[expected], atol=1e-5)
    assert not torch.allclose(out.logprobs[out.sampled], soft_logprobs[out.sampled], atol=1e-3)


def test_peaked_attention_gives_finite_losses_and_gradients():
    model = hard_captioner(hard_sample_prob=1.0).train()
    with torch.no_grad():
        model.decoder.attention.score.weight.mul_(1e4)  # α is one-hot to float precision
    tokens, lengths = caption_batch([6, 4], 24)
    out = model(random_features(model, 2), tokens, lengths)
    loss = caption_loss(out.logprobs, out.alphas, tokens, lengths, 1.0)[0] + hard_attention_loss(model, out, tokens)
    loss.backward()
    assert torch.isfinite(out.location_logprob).all() and torch.isfinite(out.entropy).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_long_hard_attention_run_stays_finite_and_learns():
    model = hard_captioner(grid_size=3).train()
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    features = random_features(model, 16)
    tokens, lengths = caption_batch([6] * 16, 24)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        out = model(features, tokens, lengths)
        loss, nll = caption_loss(out.logprobs, out.alphas, tokens, lengths, 1.0)
        (loss + hard_attention_loss(model, out, tokens) / int(lengths.sum())).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        losses.append(nll.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model.reward_baseline)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_decoding_reads_the_expectation_like_the_soft_model():
    hard = hard_captioner().eval()
    soft = Captioner(tiny_config()).eval()
    soft.load_state_dict(hard.state_dict(), strict=False)
    features = random_features(hard, 3)
    tokens, lengths = caption_batch([5, 3, 4], 24)
    out = hard(features, tokens, lengths)  # eval mode: no sampling
    assert out.location_logprob is None and out.sampled is None
    assert torch.equal(out.logprobs, soft(features, tokens, lengths).logprobs)
    for a, b in zip(decode(hard, features, beam_size=3, n_best=2), decode(soft, features, beam_size=3, n_best=2),
                    strict=True):
        assert [h.tokens for h in a.hypotheses] == [h.tokens for h in b.hypotheses]
        assert torch.equal(a.attention, b.attention)
        assert torch.allclose(a.attention.sum(dim=(1, 2)), torch.ones(len(a.tokens)), atol=1e-5)


def test_checkpoint_round_trip_keeps_the_kind_and_the_baseline(tmp_path):
    model = hard_captioner(image_size=64)
    model.reward_baseline.fill_(-7.5)
    model.reward_baseline_updates.fill_(12)
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(24 - len(SPECIALS)))])
    loaded = load_captioner(save_checkpoint(tmp_path / "hard.pt", model, vocab)).model
    assert loaded.config.attention == "hard"
    assert loaded.reward_baseline.item() == -7.5 and loaded.reward_baseline_updates.item() == 12
    features = random_features(model, 2)
    before = decode(model.eval(), features, beam_size=2)
    after = decode(loaded.eval(), features, beam_size=2)
    assert [r.tokens for r in before] == [r.tokens for r in after]


def test_hard_attention_loss_refuses_soft_outputs():
    model = Captioner(tiny_config()).train()
    tokens, lengths = caption_batch([3], 24)
    with pytest.raises(ValueError, match="hard-attention model in training mode"):
        hard_attention_loss(model, model(random_features(model, 1), tokens, lengths), tokens)
