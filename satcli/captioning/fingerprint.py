"""The fingerprint of a caption run: everything that changes what a row holds. A run may only resume an unfinished
run, or extend a finished output, made with the same."""

from __future__ import annotations

from typing import Any

from models.data import DataConfig
from models.decoding import DecodingOptions


def fingerprint(model_sha256: str, preprocessing: DataConfig, decoding: DecodingOptions,
                max_pixels: int | None) -> dict[str, Any]:
    """The checkpoint's hash, the decoding options, the preprocessing and the pixel limit, as JSON values."""
    return {
        "model_sha256": model_sha256,
        "beam_size": decoding.beam_size,
        "max_length": decoding.max_length,
        "length_penalty": decoding.length_penalty,
        "n_best": decoding.n_best,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
        "min_length": decoding.min_length,
        "banned_ids": list(decoding.banned_ids),
        "image_size": int(preprocessing.image_size),
        "mean": [float(v) for v in preprocessing.mean],
        "std": [float(v) for v in preprocessing.std],
        "max_pixels": max_pixels,
    }


def difference(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """What differs between two fingerprints, in words (``a different model``, ``different options (...)``)."""
    if not isinstance(previous, dict):
        return "an unknown model or options"
    changed = [key for key in current if previous.get(key) != current.get(key)]
    if "model_sha256" in changed:
        return "a different model"
    return "different options (" + ", ".join(f"{k} {previous.get(k)} → {current.get(k)}" for k in changed) + ")"
