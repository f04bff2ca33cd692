"""``satcli info CKPT``: what a checkpoint is (encoder, grid, vocabulary, preprocessing, training options, best
validation scores, SHA-256, the satcli that wrote it), read without building the network."""

from __future__ import annotations

from pathlib import Path

from satcli.formats.model_info import ModelInfo, model_info


def run(model: Path) -> ModelInfo:
    """Describe the checkpoint at ``model`` (a run folder means its best.pt)."""
    return model_info(model)
