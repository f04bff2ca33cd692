"""Does the caption name what is in the picture? Object precision/recall, exact-set rate and CHAIR.

Every image of a dataset with ``objects`` carries, per object, a ``label`` and the ``words`` that refer to it
(synonyms and plurals included: ``"big"``, ``"discs"``). Over the whole dataset these give a lexicon, word →
the labels it can refer to. A caption names objects through *mentions*: maximal runs of lexicon words, each
run cut where its words stop sharing a label. A mention names label L when L is its only shared label, or the
shortest one (``"dog"`` names *dog*, not *hot dog*); a mention shared by several labels of equal length
(``"red circle"`` when circles come large and small) names none. Entries with spaces (``"hot dog"``) are matched
as phrases before that.

The labels *present* in an image are those of its objects and, as in CHAIR (Rohrbach et al. 2018;
LisaAnne/Hallucination's ``get_annotations`` joins COCO's instance labels and the objects its reference captions
name), those its reference captions name (:func:`present_objects`): a caption naming a person that every
reference mentions but no instance box outlines hallucinates nothing. On datasets whose references name
exactly their objects (shapes) this changes nothing.

Per image, the named labels (a set) against the labels present (a set) give

- object precision and recall, over all images (micro-averaged),
- the exact-set rate: the share of images whose caption names exactly the labels present,
- CHAIR-i (Rohrbach et al., 2018): hallucinated mentions / all mentions that name a label,
- CHAIR-s: captions with at least one hallucinated mention / all captions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

Lexicon = dict[tuple[str, ...], frozenset[str]]  # word or phrase (as tokens) → labels it may refer to


def build_lexicon(images: Iterable[Sequence[dict]]) -> Lexicon:
    """Word (or phrase) → labels, from every image's ``objects`` (``[{label, words}, ...]``)."""
    found: dict[tuple[str, ...], set[str]] = {}
    for objects in images:
        for obj in objects or ():
            for word in obj.get("words") or ():
                key = tuple(word.lower().split())
                if key:
                    found.setdefault(key, set()).add(obj["label"])
    return {key: frozenset(labels) for key, labels in found.items()}


def mentions(tokens: Sequence[str], lexicon: Lexicon) -> list[str]:
    """The labels a caption names, one per mention, in caption order (repeats kept)."""
    longest = max((len(k) for k in lexicon), default=1)
    units: list[frozenset[str] | None] = []  # per matched word or phrase: its labels; None between mentions
    i = 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            key = tuple(t.lower() for t in tokens[i : i + n])
            if key in lexicon:
                units.append(lexicon[key])
                i += n
                break
        else:
            units.append(None)
            i += 1
    named: list[str] = []
    shared: frozenset[str] | None = None
    for labels in [*units, None]:
        if labels is not None and shared is not None and shared & labels:
            shared &= labels
            continue
        if shared:
            label = _resolve(shared)
            if label is not None:
                named.append(label)
        shared = labels
    return named


def _resolve(labels: frozenset[str]) -> str | None:
    if len(labels) == 1:
        return next(iter(labels))
    ranked = sorted(labels, key=lambda label: len(label.split()))
    shortest = len(ranked[0].split())
    return ranked[0] if len(ranked[1].split()) > shortest else None


def present_objects(labels: Iterable[str], references: Iterable[Sequence[str]], lexicon: Lexicon) -> set[str]:
    """The labels present in an image: its objects' ``labels`` and every label its tokenised ``references``
    name (CHAIR's ground truth, see the module docstring)."""
    return set(labels).union(*(mentions(tokens, lexicon) for tokens in references))


@dataclass
class ObjectScores:
    """Object precision/recall, exact-set rate and CHAIR-i/-s (0–1), and what they were counted over."""

    precision: float = 0.0
    recall: float = 0.0
    exact_set: float = 0.0
    chair_i: float = 0.0
    chair_s: float = 0.0
    n_images: int = 0
    n_mentions: int = 0
    n_hallucinated: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def object_scores(captions: Iterable[tuple[Sequence[str], Iterable[str]]], lexicon: Lexicon) -> ObjectScores:
    """Score captions against the objects present. Each item: the caption's words and the labels present."""
    n_images = n_exact = n_named = n_present = n_right = 0
    n_mentions = n_hallucinated = n_bad_captions = 0
    for tokens, present_labels in captions:
        present = set(present_labels)
        said = mentions(tokens, lexicon)
        named = set(said)
        n_images += 1
        n_exact += named == present
        n_named, n_present, n_right = n_named + len(named), n_present + len(present), n_right + len(named & present)
        wrong = sum(label not in present for label in said)
        n_mentions, n_hallucinated = n_mentions + len(said), n_hallucinated + wrong
        n_bad_captions += wrong > 0
    if n_images == 0:
        return ObjectScores()
    return ObjectScores(precision=n_right / n_named if n_named else 0.0,
                        recall=n_right / n_present if n_present else 0.0,
                        exact_set=n_exact / n_images, chair_i=n_hallucinated / n_mentions if n_mentions else 0.0,
                        chair_s=n_bad_captions / n_images, n_images=n_images, n_mentions=n_mentions,
                        n_hallucinated=n_hallucinated)
