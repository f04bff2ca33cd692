"""The captioner on its device: eval mode, channels-last, and one batch of uint8 images → captions."""

from __future__ import annotations

import contextlib

import torch

from models.captioner import Captioner
from models.data import DataConfig, normalise
from models.decoding import DecodingOptions, DecodingResult, decode


def prepare_model(model: Captioner, device: torch.device) -> Captioner:
    """Eval mode on ``device``; channels-last convolutions (about 2× faster for EfficientNet on CPU)."""
    model = model.to(device).eval()
    model.encoder.to(memory_format=torch.channels_last)
    return model


def caption_batch(model: Captioner, images: torch.Tensor, preprocessing: DataConfig,
                  options: DecodingOptions) -> list[DecodingResult]:
    """uint8 images (B, 3, S, S), on any device → one DecodingResult per image (encoder + batched beam search).

    Normalises on the model's device; on CUDA runs under autocast (bfloat16 where supported, else float16).
    """
    device = model.device
    x = images.to(device, non_blocking=True)
    x = normalise(x, preprocessing).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast: contextlib.AbstractContextManager = torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext()
    with autocast:
        return decode(model, x, options)
