"""One call from Python: ``satcli.load("runs/x/best.pt").caption(["a.jpg", "b.png"], beam_size=3)``.

The same images, model and decoding as ``satcli caption`` (the same loader, preprocessing and batched beam
search), without the Parquet file: one dict per image, in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.decoding import DecodingOptions
from satcli.captioning.loading import ImageFiles
from satcli.captioning.model import caption_batch, prepare_model
from satcli.core.defaults import default_model
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.data.images import DEFAULT_MAX_PIXELS
from satcli.data.text import detokenize
from satcli.data.vocab import banned_words
from satcli.formats.checkpoint import LoadedCheckpoint, load_captioner


@dataclass
class CaptionPipeline:
    """A loaded captioner on its device. ``caption(paths, **decoding)`` → one dict per image."""

    checkpoint: LoadedCheckpoint
    device: torch.device
    batch_size: int = 32
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @property
    def model(self):
        return self.checkpoint.model

    def caption(self, paths: str | Path | Sequence[str | Path], **decoding: Any) -> list[dict[str, Any]]:
        """Caption image files. ``decoding``: :class:`models.decoding.DecodingOptions` fields (``beam_size=3``,
        ``max_length``, ``length_penalty``, ``n_best``, ``no_repeat_ngram_size``, ``min_length``; ``banned_ids``
        defaults to ``<unk>``, as ``satcli caption`` bans it, and ``banned_ids=()`` allows it).

        Each dict: ``path``, ``caption`` (str), ``words`` (list of str), ``word_probs`` (each word's
        probability), ``sum_logprob``, ``finished``, ``attention`` (float32 numpy array (n_words, H, W), each
        grid summing to 1), ``error`` (None, or why the file could not be captioned, as ``kind: reason``;
        the other fields are then None) and ``alternatives`` (``n_best`` > 1: the runners-up, best first, each
        ``{"caption", "sum_logprob", "finished"}``; else None).
        """
        if isinstance(paths, (str, Path)):
            paths = [paths]
        try:
            options = DecodingOptions(**{"beam_size": 3, "banned_ids": banned_words(allow_unk=False), **decoding})
        except (TypeError, ValueError) as error:
            raise SatcliError(str(error)) from None
        out: list[dict[str, Any]] = []
        for start in range(0, len(paths), self.batch_size):
            out.extend(self._batch([str(p) for p in paths[start : start + self.batch_size]], options))
        return out

    def _batch(self, paths: list[str], options: DecodingOptions) -> list[dict[str, Any]]:
        # caption's own loader: the same pixels, and the same error rows (bad names and unreadable files included)
        files = ImageFiles(paths, self.checkpoint.preprocessing, self.max_pixels)
        rows: list[dict[str, Any]] = []
        images = []
        for index, path in enumerate(paths):
            _, image, _, _, error = files.load(index)
            rows.append({"path": path, "caption": None, "words": None, "word_probs": None, "sum_logprob": None,
                         "finished": None, "attention": None, "error": error, "alternatives": None})
            if error is None:
                images.append(image)
        if images:
            results = iter(caption_batch(self.model, torch.stack(images), self.checkpoint.preprocessing, options))
            words = self.checkpoint.vocab.words
            for row in rows:
                if row["error"] is not None:
                    continue
                result = next(results)
                best = result.best
                tokens = [words[i] for i in best.tokens]
                row.update(caption=detokenize(tokens), words=tokens,
                           word_probs=[float(np.exp(v)) for v in best.token_logprobs],
                           sum_logprob=float(best.sum_logprob), finished=bool(best.finished),
                           attention=best.attention.float().cpu().numpy())
                if options.n_best > 1:  # the runners-up, as the results' alternatives column holds them
                    row["alternatives"] = [{"caption": detokenize([words[i] for i in h.tokens]),
                                            "sum_logprob": float(h.sum_logprob), "finished": bool(h.finished)}
                                           for h in result.hypotheses[1:]]
        return rows


def load(checkpoint: str | Path | None = None, device: str = "auto", batch_size: int = 32) -> CaptionPipeline:
    """A captioner ready to use: ``satcli.load("runs/x/best.pt").caption(["a.jpg"])``.

    ``checkpoint`` None: ``$SATCLI_MODEL``, else the model of the most recent ``satcli train`` (as the CLI).
    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """
    resolved = resolve_device(device)
    loaded = load_captioner(Path(checkpoint) if checkpoint is not None else default_model(), resolved)
    loaded.model = prepare_model(loaded.model, resolved)
    return CaptionPipeline(loaded, resolved, batch_size)
