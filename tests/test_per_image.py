"""Per-image scores of evaluate's predictions, against the corpus scores they are the parts of and pycocoevalcap."""

import pytest

from satcli.scoring.metrics import cider_d
from satcli.scoring.per_image import per_image_scores

REFS = [[["a", "red", "circle", "on", "the", "left"], ["a", "small", "red", "circle"]],
        [["two", "blue", "squares"], ["a", "pair", "of", "blue", "squares"]],
        [["a", "green", "triangle", "above", "a", "star"], ["a", "triangle", "and", "a", "star"]]]
CAPTIONS = [["a", "red", "circle", "on", "the", "left"], ["a", "blue", "square"], ["a", "yellow", "star"]]


def test_cider_d_per_image_averages_to_the_corpus_score_and_ranks_the_worst_last():
    scores = per_image_scores(REFS, CAPTIONS)
    assert sum(s.cider_d for s in scores) / 3 == pytest.approx(cider_d(REFS, CAPTIONS))
    assert scores[0].cider_d > scores[1].cider_d and scores[0].bleu4 > 0.9  # an exact reference
    assert scores[2].bleu4 < 1e-3  # no 4-gram in common


def test_bleu4_per_image_is_pycocoevalcaps_per_image_bleu():
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [" ".join(c)] for i, c in enumerate(CAPTIONS)}
    _, per_image = bleu.Bleu(4).compute_score(gts, res, verbose=0)
    ours = per_image_scores(REFS, CAPTIONS)
    assert [s.bleu4 for s in ours] == pytest.approx(per_image[3], rel=1e-6, abs=1e-12)


def test_objects_named_and_present():
    lexicon = {(word,): frozenset({label}) for word, label in
               [("circle", "circle"), ("star", "star"), ("triangle", "triangle"), ("square", "square"),
                ("squares", "square")]}
    scores = per_image_scores(REFS, CAPTIONS, [["circle"], ["square", "square"], ["triangle", "star"]], lexicon)
    assert [(s.objects_named, s.objects_present) for s in scores] == [
        (["circle"], ["circle"]), (["square"], ["square"]), (["star"], ["star", "triangle"])]
