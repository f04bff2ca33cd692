"""``satcli train --feature-dropout p``: in training, each picture's feature channels are dropped with
probability p in all its cells alike; evaluation and decoding read the features as they are."""

import pytest
import torch

from models.captioner import Captioner, CaptionerConfig, drop_channels


def test_a_dropped_channel_is_dropped_in_every_cell_and_the_kept_ones_are_scaled():
    torch.manual_seed(0)
    features = torch.rand(64, 9, 32) + 0.5  # no zeros of their own
    out = drop_channels(features, 0.25, training=True)
    dropped = out == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # per picture and channel, all cells alike
    kept = ~dropped
    assert torch.allclose(out[kept], features[kept] / 0.75)
    share = dropped[:, 0].float().mean().item()
    assert 0.2 < share < 0.3  # about p of the channels, drawn per picture
    assert not torch.equal(dropped[0, 0], dropped[1, 0])


def test_outside_training_or_at_zero_the_features_are_untouched():
    features = torch.rand(4, 9, 8)
    assert drop_channels(features, 0.5, training=False) is features
    assert drop_channels(features, 0.0, training=True) is features


def test_the_model_drops_in_train_mode_only():
    config = CaptionerConfig(vocab_size=12, embed_dim=8, attention_dim=8, decoder_dim=8, dropout=0.0,
                             feature_dropout=0.5)  # no other randomness in training
    model = Captioner(config)
    features = torch.rand(3, 49, model.encoder.spec.dim)
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]])
    lengths = torch.tensor([3, 2, 3])
    model.eval()
    first, second = (model(features, tokens, lengths).logprobs for _ in range(2))
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(1)
    a = model(features, tokens, lengths).logprobs
    torch.manual_seed(2)
    b = model(features, tokens, lengths).logprobs
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="feature_dropout"):
        CaptionerConfig(vocab_size=12, feature_dropout=1.0)
