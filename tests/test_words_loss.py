"""``satcli train --words-loss λ``: a bag-of-words head on the mean feature learns which words a caption holds, its
probabilities start the LSTM, and λ times its multi-label cross-entropy joins the training loss."""

import math

import pytest
import torch

from models.captioner import Captioner, CaptionerConfig, bag_of_words_loss

END = 2


def slow_bag_of_words_loss(logits, tokens, lengths):
    """The loss written out: for each caption and vocabulary word, -log σ(x) if the word is among the caption's
    words (not <start>, <end> or padding), else -log(1 - σ(x))."""
    losses = []
    for row, tokens_row, length in zip(logits.tolist(), tokens.tolist(), lengths.tolist(), strict=True):
        words = set(tokens_row[1:length])  # w1 … wn: the targets without the final <end>
        total = 0.0
        for v, x in enumerate(row):
            p = 1 / (1 + math.exp(-x))
            total -= math.log(p) if v in words else math.log(1 - p)
        losses.append(total)
    return losses


def test_the_loss_is_the_multi_label_cross_entropy_of_each_caption_s_own_words():
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    tokens = torch.tensor([[1, 5, 6, 5, 2, 0], [1, 7, 2, 0, 0, 0], [1, 8, 9, 10, 11, 2]])
    lengths = torch.tensor([4, 2, 5])  # words + <end>
    fast = bag_of_words_loss(logits, tokens, lengths, END)
    assert fast.tolist() == pytest.approx(slow_bag_of_words_loss(logits, tokens, lengths), rel=1e-5)


def test_the_head_starts_the_lstm_and_learns_the_words_of_the_captions():
    config = CaptionerConfig(vocab_size=12, embed_dim=8, attention_dim=8, decoder_dim=16, dropout=0.0,
                             words_loss=1.0)
    torch.manual_seed(0)
    model = Captioner(config)
    features = torch.rand(2, 49, model.encoder.spec.dim)
    features[1] = -features[1]  # two pictures whose mean features differ
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    lengths = torch.tensor([3, 2])
    model.eval()
    before = model(features, tokens, lengths)
    assert before.word_logits.shape == (2, 12)
    with torch.no_grad():  # the initial state reads the head: other head weights, other first words
        model.decoder.words[-1].bias.add_(3.0)
    assert not torch.allclose(model(features, tokens, lengths).logprobs[:, 0], before.logprobs[:, 0])

    model.train()
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    start = bag_of_words_loss(model(features, tokens, lengths).word_logits, tokens, lengths, END).sum().item()
    for _ in range(60):
        optimizer.zero_grad()
        bag_of_words_loss(model(features, tokens, lengths).word_logits, tokens, lengths, END).sum().backward()
        optimizer.step()
    output = model(features, tokens, lengths)
    assert bag_of_words_loss(output.word_logits, tokens, lengths, END).sum().item() < start / 10
    present = torch.sigmoid(output.word_logits) > 0.5
    assert present[0].nonzero().flatten().tolist() == [5, 6] and present[1].nonzero().flatten().tolist() == [7]


def test_without_the_option_the_model_has_no_head_and_its_checkpoints_keep_their_keys():
    plain = Captioner(CaptionerConfig(vocab_size=12, embed_dim=8, attention_dim=8, decoder_dim=8))
    assert plain.decoder.words is None
    assert not any("words" in key for key in plain.state_dict())
    assert plain(torch.rand(1, 49, plain.encoder.spec.dim), torch.tensor([[1, 5, 2]]),
                 torch.tensor([2])).word_logits is None
    with pytest.raises(ValueError, match="words_loss"):
        CaptionerConfig(vocab_size=12, words_loss=-1.0)
