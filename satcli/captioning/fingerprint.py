"""The fingerprint of a caption run: everything that changes what a row holds. A run may only resume an unfinished
run, or extend a finished output, made with the same."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from models.data import DataConfig
from models.decoding import DecodingOptions
from satcli.core.defaults import default_model
from satcli.formats.checkpoint import LoadedCheckpoint, checkpoint_sha256, load_captioner


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


def load_run_model(model: Path | None, decoding: DecodingOptions, max_pixels: int | None
                   ) -> tuple[LoadedCheckpoint, Path, dict[str, Any]]:
    """The checkpoint of a caption run (``model``, else the remembered one), loaded once on the CPU and
    validated before any work, with its path and the run's fingerprint."""
    model_path = Path(model if model is not None else default_model())
    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps with reading the checkpoint
        sha256 = pool.submit(checkpoint_sha256, model_path)
        loaded = load_captioner(model_path)
        return loaded, model_path, fingerprint(sha256.result(), loaded.preprocessing, decoding, max_pixels)
