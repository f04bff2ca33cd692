"""Augmented views of the feature cache: with a frozen encoder, the training pictures are also encoded a few
more times, each time turned, zoomed and lit a little differently, and every caption of an epoch reads its
picture's features from one view chosen at random. The decoder then learns the words from more than one way of
seeing each object, at the cost of encoding the training split once more per view (the views are cached like the
plain features, so later runs pay nothing).

No hue change, and no mirror image among these views: colours, left and right are words in the captions. The
mirrored picture is a view of its own (:data:`FLIP_VIEW`, ``satcli train --feature-flips``): the training
pictures flipped left-right and encoded, cached like the others, and read only by captions whose ``left`` and
``right`` training swaps (satcli.training.batches.FeatureFlips). Mirroring the cached grid instead is not the
same: each cell's features describe its own pixels unmirrored (cosine about 0.9 to the mirrored picture's).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class ViewAugment:
    """How far a view may depart from the picture (each drawn uniformly per image)."""

    rotation: tuple[float, float] = (-25.0, 25.0)  # degrees clockwise, about the centre; edge pixels fill corners
    scale: tuple[float, float] = (0.9, 1.1)  # zoom about the centre
    brightness: tuple[float, float] = (0.6, 1.4)  # multiply every channel
    saturation: tuple[float, float] = (0.5, 1.3)  # blend with the grey picture (<1) or away from it (>1)

    def describe(self) -> dict:
        """As the cache's JSON description holds it (ranges as lists), so a reread description compares equal."""
        return {name: list(value) for name, value in asdict(self).items()}


AUGMENT = ViewAugment()
FLIP_VIEW = -1  # the view number of the mirrored picture (views 1, 2, ... are the augmented ones)


def view_name(view: int) -> str:
    """How a view is named in its cache file: ``view2``, ``flip``."""
    return "flip" if view == FLIP_VIEW else f"view{view}"


def view_generator(view: int, row: int) -> torch.Generator:
    """The random stream of picture ``row`` in ``view``: a function of those alone, so a view re-encoded later,
    in other batches or by another rank, is the same view."""
    return torch.Generator().manual_seed(view * 1_000_003 + row)


def augment(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], generator: torch.Generator,
            spec: ViewAugment = AUGMENT) -> torch.Tensor:
    """A normalised (3, S, S) picture → the same picture turned, zoomed and relit, still normalised."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=generator))

    angle, scale = math.radians(uniform(*spec.rotation)), uniform(*spec.scale)
    brightness, saturation = uniform(*spec.brightness), uniform(*spec.saturation)
    # output pixel p samples the input at R(-angle) p / scale (centred coordinates, y down): the picture turned
    # clockwise on screen by ``angle`` and zoomed by ``scale``; edge pixels fill what comes in from outside
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[[cos, sin, 0.0], [-sin, cos, 0.0]]], dtype=image.dtype)
    pixels = (image * std_t + mean_t).unsqueeze(0)  # [0, 1]
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    pixels = TF.adjust_saturation(TF.adjust_brightness(pixels.clamp(0, 1), brightness), saturation)
    return (pixels - mean_t) / std_t


@dataclass
class FeatureViews:
    """Which cached view each caption reads this epoch: 0 is the plain picture, 1..K the augmented views."""

    chosen: torch.Tensor  # (n_captions,) long

    @classmethod
    def for_epoch(cls, n_views: int, n_captions: int, seed: int, epoch: int) -> FeatureViews:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 41)
        return cls(torch.randint(0, n_views + 1, (n_captions,), generator=generator))

    def gather(self, arrays: list[np.ndarray], rows: np.ndarray, captions: torch.Tensor) -> torch.Tensor:
        """(B, H*W, D) float32 features: caption i's picture ``rows[i]`` as seen in its chosen view."""
        which = self.chosen[captions].numpy()
        out = torch.empty((len(rows), *arrays[0].shape[1:]), dtype=torch.float32)
        for view in np.unique(which):
            picked = np.flatnonzero(which == view)
            out[torch.from_numpy(picked)] = torch.from_numpy(np.asarray(arrays[view][rows[picked]], dtype=np.float32))
        return out
