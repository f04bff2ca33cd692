"""Each image's own scores, for predictions a person can read: BLEU-4 and CIDEr-D of its caption against its
references, and which objects it named, missed and invented.

BLEU-4 is COCO's per-image BLEU (:func:`satcli.scoring.metrics.coco_bleu` on the one image: what
pycocoevalcap's ``Bleu`` lists per image); CIDEr-D takes its document frequencies from the whole split, as the
corpus score does, whose mean over images it is. Both on satcli's own tokens (the references through
:func:`satcli.data.text.tokenize`), so they rank images; the corpus scores of ``--coco`` stay the official ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from satcli.scoring.metrics import CiderD, coco_bleu
from satcli.scoring.objects import Lexicon, mentions


@dataclass(frozen=True)
class ImageScores:
    bleu4: float
    cider_d: float  # COCO's scale (×10)
    objects_named: list[str] | None = None  # labels the caption names, in the order it names them
    objects_present: list[str] | None = None  # labels in the picture


def per_image_scores(references: Sequence[Sequence[Sequence[str]]], captions: Sequence[Sequence[str]],
                     objects: Sequence[Sequence[str]] | None = None,
                     lexicon: Lexicon | None = None) -> list[ImageScores]:
    """One :class:`ImageScores` per caption. ``references[i]``: image i's tokenised references; ``objects[i]``:
    the labels present (with ``lexicon``, the object columns are filled)."""
    if not captions:
        return []
    cider = CiderD(references).scores(captions, references)
    out = []
    for i, (refs, words) in enumerate(zip(references, captions, strict=True)):
        bleu4 = coco_bleu([refs], [words])["bleu4"] if refs else 0.0
        named = present = None
        if objects is not None and lexicon is not None:
            named = list(dict.fromkeys(mentions(words, lexicon)))
            present = sorted(set(objects[i]))
        out.append(ImageScores(float(bleu4), float(cider[i]), named, present))
    return out
