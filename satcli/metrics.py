"""Caption metrics. BLEU is NLTK's ``corpus_bleu`` with every reference of each image, as the PyTorch
tutorials report it, so numbers compare with theirs. Scores are on the 0–1 scale here; tables show 0–100."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.translate.bleu_score import corpus_bleu

BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (0.5, 0.5),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


def bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4. ``references[i]`` is the list of tokenised reference captions of image i,
    ``hypotheses[i]`` its tokenised generated caption."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns when a hypothesis has no n-gram of some order
        scores = corpus_bleu(references, hypotheses, weights=list(BLEU_WEIGHTS.values()))
    return {name: float(score) for name, score in zip(BLEU_WEIGHTS, scores, strict=True)}
