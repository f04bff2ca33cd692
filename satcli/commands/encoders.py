"""``satcli encoders``: the image encoders a model can be built on, with their input size, grid and weights."""

from __future__ import annotations

from models import encoders
from models.encoders import EncoderSpec


def run() -> list[EncoderSpec]:
    """Every encoder satcli knows, in the order ``satcli train --encoder`` lists them (read at call time)."""
    return [spec for _, spec in encoders.ENCODERS.items()]


def default() -> str:
    """The encoder ``satcli train`` uses when none is named."""
    return encoders.DEFAULT_ENCODER
