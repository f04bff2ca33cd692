"""``satcli train --unlikelihood α``: Welleck et al.'s token-level unlikelihood loss on the words a caption has
already written, the training-side remedy for captions that name one object twice."""

import math

import pytest
import torch

from models.captioner import unlikelihood_loss
from satcli.training.options import TrainOptions


def slow_unlikelihood(logprobs, tokens, lengths):
    """Eq. 4 of the paper written out: Σ_t Σ_{c ∈ {y_1..y_{t-1}} \\ {y_t}} -log(1 - p(c | y_<t))."""
    total = 0.0
    for b in range(logprobs.shape[0]):
        targets = tokens[b, 1:].tolist()
        for t in range(int(lengths[b])):
            for c in set(targets[:t]) - {targets[t]}:
                total -= math.log(1 - math.exp(float(logprobs[b, t, c])))
    return total


def test_the_loss_is_the_paper_s_sum_over_the_earlier_words_that_are_not_the_target():
    torch.manual_seed(0)
    logprobs = torch.randn(3, 6, 12).log_softmax(-1)
    # "a dog and a cat <end>": the second "a" is a target, so it is no candidate there; padding is left out
    tokens = torch.tensor([[1, 5, 6, 7, 5, 8, 2], [1, 9, 9, 2, 0, 0, 0], [1, 4, 10, 11, 10, 2, 0]])
    lengths = torch.tensor([6, 3, 5])
    assert unlikelihood_loss(logprobs, tokens, lengths).item() == pytest.approx(
        slow_unlikelihood(logprobs, tokens, lengths), rel=1e-5)
    # no earlier words, nothing to push down: the first step of every caption adds nothing
    assert unlikelihood_loss(logprobs[:, :1], tokens[:, :2], torch.ones(3, dtype=torch.long)).item() == 0.0


def test_it_takes_probability_from_a_repeated_word_where_another_belongs():
    """A next-word table trained by NLL alone keeps some mass on the earlier word "train" at the second noun;
    with the unlikelihood term that mass goes."""
    tokens = torch.tensor([[1, 4, 5, 6, 4, 7, 2]])  # a train below a rocket <end>: ids 4=a 5=train 6=below 7=rocket
    lengths = torch.tensor([6])

    def train(alpha):
        torch.manual_seed(0)
        logits = torch.zeros(1, 6, 10, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=0.5)
        for _ in range(200):
            optimizer.zero_grad()
            logprobs = logits.log_softmax(-1)
            targets = tokens[:, 1:7]
            nll = -logprobs.gather(2, targets.unsqueeze(-1)).sum()
            loss = 0.1 * nll + alpha * unlikelihood_loss(logprobs, tokens, lengths)  # weak NLL: not yet converged
            loss.backward()
            optimizer.step()
        return logits.detach().softmax(-1)[0, 4, 5].item()  # p(train) at the second noun's step

    assert train(1.0) < train(0.0) / 3


def test_off_by_default_and_a_train_option():
    assert TrainOptions(dataset="shapes").unlikelihood == 0.0
    assert TrainOptions(dataset="shapes", unlikelihood=0.5).unlikelihood == 0.5
