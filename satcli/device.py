"""Where models run: ``--device auto|cpu|cuda|cuda:N``, the same rule for every command."""

from __future__ import annotations

import os

import torch

from satcli.errors import SatcliError


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU. Under torchrun a plain ``cuda`` means this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise SatcliError(f"unknown device {device!r}; use auto, cpu or cuda") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SatcliError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    elif resolved.type != "cpu":
        raise SatcliError(f"unsupported device {device!r}; use auto, cpu or cuda")
    return resolved
