"""The captioner on its device: eval mode, channels-last, and one batch of uint8 images → captions."""

from __future__ import annotations

import torch

from models.captioner import Captioner
from models.data import DataConfig, normalise
from models.decoding import DecodingOptions, DecodingResult, decode
from satcli.data.features import encode_images


def prepare_model(model: Captioner, device: torch.device) -> Captioner:
    """Eval mode on ``device``; channels-last convolutions (about 2× faster for EfficientNet on CPU)."""
    model = model.to(device).eval()
    model.encoder.to(memory_format=torch.channels_last)
    return model


def caption_batch(model: Captioner, images: torch.Tensor, preprocessing: DataConfig,
                  options: DecodingOptions) -> list[DecodingResult]:
    """uint8 images (B, 3, S, S), on any device → one DecodingResult per image (encoder + batched beam search).

    Normalises on the model's device; encodes with :func:`satcli.data.features.encode_images`, the precision
    ``evaluate`` decodes at too (on CUDA the encoder under autocast, the beam search in float32).
    """
    x = images.to(model.device, non_blocking=True)
    x = normalise(x, preprocessing).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = encode_images(model, x)
    return decode(model, features, options)
