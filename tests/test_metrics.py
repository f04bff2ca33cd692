import shutil

import numpy as np
import pytest
from nltk.translate.bleu_score import corpus_bleu

from satcli.scoring.metrics import CiderD, bleu, cider_d, coco_bleu, ptb_tokenize, rouge_l, rouge_l_scores

# Captions with repeats, shared n-grams, different lengths, an empty hypothesis and one with no overlap at all.
REFERENCES = [
    ["a large red circle to the left of a small blue square", "a big red disc left of a little blue block",
     "a small blue square to the right of a large red circle"],
    ["two little green triangles in a column", "two small green triangles one above the other",
     "a column of two small green triangles", "two green triangles"],
    ["a yellow star between two purple crosses", "two small purple crosses around a big yellow star"],
    ["a dog runs on the beach", "a brown dog running along the sand by the sea", "a dog on a beach"],
    ["a man rides a horse", "a person riding a brown horse in a field"],
]
HYPOTHESES = [
    "a large red circle to the left of a small blue square",
    "two green triangles in a row",
    "a star between two crosses",
    "",
    "an airplane parked on the tarmac",
]


def _tokens(captions):
    return [c.split() for c in captions]


def _coco_inputs():
    gts = {i: list(refs) for i, refs in enumerate(REFERENCES)}
    res = {i: [hyp] for i, hyp in enumerate(HYPOTHESES)}
    return gts, res


def test_bleu_is_nltk_corpus_bleu_with_every_reference():
    references = [_tokens(refs) for refs in REFERENCES]
    hypotheses = [h.split() for h in HYPOTHESES]
    ours = bleu(references, hypotheses)
    for n, key in enumerate(("bleu1", "bleu2", "bleu3", "bleu4"), start=1):
        expected = corpus_bleu(references, hypotheses, weights=[1 / n] * n)
        assert ours[key] == pytest.approx(expected, abs=1e-12)
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1


def test_coco_bleu_equals_pycocoevalcap_bleu():
    scorers = pytest.importorskip("pycocoevalcap.bleu.bleu")
    gts, res = _coco_inputs()
    coco, _ = scorers.Bleu(4).compute_score(gts, res, verbose=0)
    references, hypotheses = [_tokens(refs) for refs in REFERENCES], [h.split() for h in HYPOTHESES]
    ours = coco_bleu(references, hypotheses)
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(coco, abs=1e-12)
    # NLTK counts a guess for the empty caption; without it both definitions agree.
    assert bleu(references, hypotheses)["bleu1"] < ours["bleu1"]
    assert bleu(references[:3], hypotheses[:3]) == pytest.approx(coco_bleu(references[:3], hypotheses[:3]))


def test_rouge_l_equals_pycocoevalcap():
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    gts, res = _coco_inputs()
    coco_mean, coco_per_image = rouge.Rouge().compute_score(gts, res)
    ours = rouge_l_scores([_tokens(refs) for refs in REFERENCES], [h.split() for h in HYPOTHESES])
    np.testing.assert_allclose(ours, coco_per_image, atol=1e-12)
    assert rouge_l([_tokens(refs) for refs in REFERENCES], [h.split() for h in HYPOTHESES]) == \
        pytest.approx(coco_mean, abs=1e-12)
    assert ours[0] == pytest.approx(1.0) and ours[3] == 0.0  # the exact copy and the empty caption


def test_cider_d_equals_pycocoevalcap():
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    gts, res = _coco_inputs()
    coco_mean, coco_per_image = cider.Cider().compute_score(gts, res)
    references = [_tokens(refs) for refs in REFERENCES]
    hypotheses = [h.split() for h in HYPOTHESES]
    np.testing.assert_allclose(CiderD(references).scores(hypotheses, references), coco_per_image, atol=1e-9)
    assert cider_d(references, hypotheses) == pytest.approx(coco_mean, abs=1e-9)
    assert coco_per_image[0] > coco_per_image[1] > coco_per_image[4] == 0.0


def test_cider_d_document_frequencies_come_from_the_corpus_given_once():
    references = [_tokens(refs) for refs in REFERENCES]
    scorer = CiderD(references)
    # Scoring a subset against its own references uses the corpus statistics, not the subset's.
    subset = scorer.scores([HYPOTHESES[1].split()], [references[1]])
    assert subset[0] == pytest.approx(scorer.scores([h.split() for h in HYPOTHESES], references)[1])
    # A word that every image's references share carries no information; a rare one does.
    assert scorer.document_frequency[("a",)] == len(REFERENCES)
    common, rare = scorer.scores([["a"], ["triangles"]], [references[1], references[1]])
    assert common == 0.0 < rare
    with pytest.raises(ValueError, match="reference sets"):
        scorer.scores([["a"]], references)


PLAIN_CAPTIONS = [
    "A dog's toy (red) is on the mat.",
    "Two men don't like it, can't they?",
    'A black-and-white photo of a "cat" & dog; 3.5 feet / 1,000 people',
    "we're they've I'll he'd I'm o'clock won't",
    "A  dog -- running - fast!",
    "an e-mail from a 3-year-old in a t-shirt; o'neil's Dr. Who",
    "the dogs' bone, isn't it... yes!!! [blue] {curly} 50% off",
    "Mt. Fuji vs. Mr Bean in the U.S. cannot gonna",
    "A man is riding his bike down the street, while a woman watches!",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference PTB tokenizer needs Java")
def test_python_tokenizer_matches_the_ptb_jar_on_plain_captions():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    expected = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PLAIN_CAPTIONS)})
    for i, caption in enumerate(PLAIN_CAPTIONS):
        assert ptb_tokenize(caption) == expected[i][0].split(), caption


def test_python_tokenizer_without_java():
    assert ptb_tokenize("A dog's toy (red), isn't it?") == ["a", "dog", "'s", "toy", "-lrb-", "red", "-rrb-",
                                                           "is", "n't", "it"]
    assert ptb_tokenize("") == []


def test_coco_metrics_without_java_say_meteor_was_skipped_and_why(monkeypatch):
    from satcli.scoring import metrics

    raw_references = [[r.capitalize() + "." for r in refs] for refs in REFERENCES]
    result = metrics.coco_metrics(raw_references, HYPOTHESES, java=False)
    assert "meteor" not in result.scores and "--no-java" in result.skipped["meteor"]
    references = [_tokens(refs) for refs in REFERENCES]
    hypotheses = [h.split() for h in HYPOTHESES]
    assert result.scores["cider_d"] == pytest.approx(cider_d(references, hypotheses))
    assert result.scores["rouge_l"] == pytest.approx(rouge_l(references, hypotheses))
    assert result.scores["bleu4"] == pytest.approx(coco_bleu(references, hypotheses)["bleu4"])
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    if metrics.importlib.util.find_spec("pycocoevalcap") is not None:
        assert "Java was not found" in metrics.coco_metrics(raw_references, HYPOTHESES).skipped["meteor"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_coco_metrics_with_java_agree_with_the_java_free_path(capfd):
    pytest.importorskip("pycocoevalcap")
    from satcli.scoring.metrics import coco_metrics

    official = coco_metrics(REFERENCES, HYPOTHESES)
    # Java's "PTBTokenizer tokenized N tokens at ..." went to the debug log, not past -q onto the terminal
    assert capfd.readouterr().err == ""
    ours = coco_metrics(REFERENCES, HYPOTHESES, java=False)
    assert official.skipped == {} and 0 < official.scores["meteor"] < 1
    for key, value in ours.scores.items():
        assert official.scores[key] == pytest.approx(value, abs=1e-9), key
