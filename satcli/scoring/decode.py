"""Decode a split and let the caller score it: the one loop behind validation in training (cross-entropy and
SCST) and ``satcli evaluate``.

The split's features come in chunks (from the feature cache, or from the encoder run over its images); every
chunk is decoded once per decoding option, so a beam-size sweep encodes each image once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import Progress

from models.captioner import Captioner
from models.data import DataConfig
from models.decoding import DecodingOptions, DecodingResult, decode
from satcli.data.features import encode_split
from satcli.data.store import StoredDataset
from satcli.scoring.metrics import CiderD, bleu


@dataclass
class Decoded:
    """One decoding option's results for a split, in row order, and the seconds spent decoding them."""

    results: list[DecodingResult] = field(default_factory=list)
    seconds: float = 0.0


def feature_chunks(features: np.ndarray, batch_size: int,
                   device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """(B, n_pixels, dim) float32 chunks of cached ``features`` in row order (on ``device`` when given)."""
    for start in range(0, len(features), batch_size):
        chunk = torch.from_numpy(np.asarray(features[start : start + batch_size], np.float32))
        yield chunk if device is None else chunk.to(device)


def split_chunks(dataset: StoredDataset, split: str, model: Captioner, device: torch.device, batch_size: int,
                 features: np.ndarray | None, progress: Progress | None = None,
                 description: str = "encoding", data: DataConfig | None = None) -> Iterator[torch.Tensor]:
    """The split's features in row order: the cached ``features`` when given, else the encoder run over its
    images (a fine-tuned encoder no longer matches the cache), prepared as ``data`` says (default: the model's)."""
    if features is None:
        return encode_split(dataset, split, model, device, batch_size, progress, description, data)
    return feature_chunks(features, batch_size)


def decode_split(model: Captioner, chunks: Iterable[torch.Tensor], decodings: Sequence[DecodingOptions],
                 device: torch.device, advance: Callable[[int], object] | None = None) -> list[Decoded]:
    """Decode every chunk with every option in ``decodings``; one :class:`Decoded` per option, images in chunk
    order. ``advance(n)`` is called after each chunk of ``n`` images (a progress bar)."""
    outputs = [Decoded() for _ in decodings]
    for chunk in chunks:
        chunk = chunk.to(device)
        for decoding, output in zip(decodings, outputs, strict=True):
            started = time.perf_counter()
            output.results.extend(decode(model, chunk, decoding))
            output.seconds += time.perf_counter() - started
        if advance is not None:
            advance(len(chunk))
    return outputs


def validation_scores(references: list[list[list[str]]], hypotheses: list[list[str]],
                      cider: bool = False) -> dict[str, float]:
    """BLEU-1..4 of decoded captions; with ``cider``, CIDEr-D too (document frequencies from these references)."""
    scores = bleu(references, hypotheses)
    if cider:
        scores["cider_d"] = float(CiderD(references).scores(hypotheses, references).mean())
    return scores
