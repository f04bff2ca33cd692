"""Small builders shared by the tests."""

import torch

from models.captioner import Captioner, CaptionerConfig


def tiny_config(**overrides) -> CaptionerConfig:
    values = dict(vocab_size=24, embed_dim=12, attention_dim=10, decoder_dim=14, dropout=0.0)
    values.update(overrides)
    return CaptionerConfig(**values)


def tiny_captioner(**overrides) -> Captioner:
    return Captioner(tiny_config(**overrides))


def random_features(model: Captioner, n_images: int) -> torch.Tensor:
    rows, cols = model.grid_shape
    return torch.randn(n_images, rows * cols, model.encoder.spec.dim)


def caption_batch(lengths: list[int], vocab_size: int, pad_to: int | None = None):
    """tokens (B, T+1) = <start> words <end> <pad>…, with lengths = words + 1."""
    T = max(lengths) if pad_to is None else pad_to
    tokens = torch.zeros(len(lengths), T + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = 1
        tokens[i, 1:n] = torch.randint(4, vocab_size, (n - 1,))
        tokens[i, n] = 2
    return tokens, torch.tensor(lengths)
