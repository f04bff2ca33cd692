"""Turning pictures into model inputs, always from the model's own :class:`Preprocessing`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from satcli.checkpoint import Preprocessing


def image_tensor(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """An RGB picture → (3, S, S) float tensor: squashed to S × S (no crop, so nothing in the picture is lost
    and boxes map linearly), scaled to [0, 1] and normalised with the model's mean and std."""
    size = preprocessing.image_size
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return normalise(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1), preprocessing)


def normalise(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 (…, 3, S, S) → normalised float, on whatever device ``images`` is."""
    mean = torch.tensor(preprocessing.mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std
