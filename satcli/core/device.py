"""Where models run: ``--device auto|cpu|cuda|cuda:N|mps``, the same rule for every command."""

from __future__ import annotations

import os

import torch

from satcli.core.errors import SatcliError

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU. Under torchrun a plain ``cuda`` means this rank's GPU.

    ``cuda:N`` must name a GPU that exists; ``mps`` (Apple silicon) must be available in this PyTorch build.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise SatcliError(f"unknown device {device!r}; use {CHOICES}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SatcliError(f"--device {device} was asked for, but no CUDA GPU is available; use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        n_gpus = torch.cuda.device_count()
        if resolved.index >= n_gpus:
            raise SatcliError(f"--device {resolved} names a GPU that is not there: this machine has {n_gpus} "
                              f"(cuda:0 to cuda:{n_gpus - 1})")
    elif resolved.type == "mps":
        if not _mps_available():
            raise SatcliError(f"--device {device} was asked for, but Apple's Metal (MPS) backend is not available "
                              "here (it needs a Mac with Apple silicon and a PyTorch built with it); use --device cpu")
        resolved = torch.device("mps")
    elif resolved.type != "cpu":
        raise SatcliError(f"unsupported device {device!r}; use {CHOICES}")
    return resolved


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
