"""What a model's images must look like, and the one way pictures become model inputs.

A :class:`DataConfig` (side, mean, std, resize filter) travels in the checkpoint, so training, fine-tuning,
evaluation and captioning all prepare images exactly as the model learnt on them. Every picture is squashed to
``image_size`` × ``image_size`` (no crop: nothing in the picture is lost and boxes map linearly) with the config's
filter, then normalised with its mean and std. (timm's ``PretrainedCfg`` / ``resolve_data_config``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from models.captioner import CaptionerConfig
from models.encoders import ENCODERS

# The filter every satcli model's feature cache was resized with since the first release (preprocess stores its
# images with bicubic, then the 256-pixel stored picture is resized to the model's side with this); a checkpoint
# that names no filter was made with it.
DEFAULT_INTERPOLATION = "bilinear"
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a model: resized to ``image_size`` square with ``interpolation``
    (antialiased), then normalised with ``mean`` and ``std`` (per RGB channel, on the [0, 1] scale)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown resize filter {self.interpolation!r}; expected one of "
                             f"{', '.join(INTERPOLATIONS)}")

    @classmethod
    def for_config(cls, config: CaptionerConfig) -> DataConfig:
        """The data config of a model built from ``config``: its encoder's mean and std, its input size."""
        spec = ENCODERS[config.encoder]
        return cls(int(config.image_size or spec.image_size), spec.mean, spec.std)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, as a checkpoint stores it."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """The inverse of :meth:`to_dict`; a dict without ``interpolation`` (older checkpoints) gets bilinear."""
        return cls(int(values["image_size"]), tuple(values["mean"]), tuple(values["std"]),  # type: ignore[arg-type]
                   str(values.get("interpolation", DEFAULT_INTERPOLATION)))


def resize(image: Any, data: DataConfig) -> torch.Tensor:
    """An RGB picture → uint8 (3, S, S) at the config's size and filter, antialiased.

    ``image``: a PIL image (resized by Pillow, the library preprocess stores images with) or a uint8 tensor
    (3, H, W) on any device (resized there by torch, the nvJPEG path: within about a grey level of Pillow's).
    """
    size = data.image_size
    if not isinstance(image, torch.Tensor):  # a PIL image: satcli hands them in, models/ never imports PIL
        if image.size != (size, size):
            image = TF.resize(image, [size, size], InterpolationMode(data.interpolation))
        return TF.pil_to_tensor(image)
    if image.shape[-2:] == (size, size):
        return image
    x = F.interpolate(image.unsqueeze(0).float(), size=(size, size), mode=data.interpolation, antialias=True,
                      align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def normalise(images: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """uint8 (…, 3, S, S) → float, scaled to [0, 1] and normalised, on whatever device ``images`` is."""
    mean = torch.tensor(data.mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(data.std, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def image_to_tensor(image: Any, data: DataConfig) -> torch.Tensor:
    """A PIL image or uint8 tensor (3, H, W) → the model's float input (3, S, S): :func:`resize`, then
    :func:`normalise`."""
    return normalise(resize(image, data), data)
