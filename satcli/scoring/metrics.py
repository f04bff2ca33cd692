"""Caption metrics. BLEU is NLTK's ``corpus_bleu`` with every reference of each image, as the PyTorch
tutorials report it, so numbers compare with theirs. Scores are on the 0–1 scale here; tables show 0–100."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from nltk.translate.bleu_score import corpus_bleu

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------
# COCO caption metrics of our own: ROUGE-L and CIDEr-D as pycocoevalcap defines them, and a PTB-like tokenizer.
# They need neither Java nor pycocoevalcap; tests check them against pycocoevalcap on the same captions.
# ---------------------------------------------------------------------------------------------------------------

# What pycocoevalcap's PTBTokenizer drops after tokenising (its PUNCTUATIONS list). It compares after the
# jar's -lowerCase, so the bracket tokens ("-lrb-" ...) are *not* dropped; we keep them too.
PTB_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "mt", "vs", "etc", "inc", "jr", "sr", "prof", "ltd",
                                "co", "corp"})
_PTB_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"),
                    "gotta": ("got", "ta")}
_PTB_TOKEN = re.compile(r"""
    (?:[^\W\d_]\.){2,}                  # dotted abbreviations: u.s. p.m. e.g.
  | [^\W\d_]+\.(?=\s|$)                 # a word and its full stop (kept together for Mr. St. ...)
  | \d+(?:[.,:]\d+)+                    # numbers and times: 3.5 1,000 3:30
  | [^\W_]+(?:[-&/'][^\W_]+)*           # words, with inner hyphens, ampersands, slashes, apostrophes
  | \.\.\.|--|[!?]+|\S                  # punctuation and any other symbol
""", re.VERBOSE)
Ngram = tuple[str, ...]
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")


def ptb_tokenize(caption: str) -> list[str]:
    """Tokenise like pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, ``-lowerCase``) followed by its
    punctuation filter, without Java. Matches the jar on plain captions: clitics split off (``dog 's``,
    ``do n't``), hyphenated words and numbers kept whole, brackets as ``-lrb-``, punctuation dropped."""
    text = unicodedata.normalize("NFKC", caption).lower().replace("\u2019", "'").replace('"', " '' ")
    tokens: list[str] = []
    for token in _PTB_TOKEN.findall(text):
        if token.endswith(".") and token.count(".") == 1 and len(token) > 1:
            stem = token[:-1]
            tokens.extend([token] if stem in _PTB_ABBREVIATIONS else _ptb_word(stem))
            continue
        tokens.extend(_ptb_word(token))
    return [t for t in tokens if t not in PTB_DROPPED]


def _ptb_word(token: str) -> list[str]:
    if token in _PTB_BRACKETS:
        return [_PTB_BRACKETS[token]]
    if token in _PTB_SPLIT_WORDS:
        return list(_PTB_SPLIT_WORDS[token])
    match = _PTB_CLITIC.match(token)
    if match:
        return [match.group(1), match.group(2)]
    if token.count("'") == 2:  # rock'n'roll → rock 'n' roll
        head, middle, tail = token.split("'")
        return [head, f"'{middle}'", tail]
    return [token]


def coco_bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]],
              n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..n as the COCO evaluation computes it (pycocoevalcap's ``Bleu``). It differs from NLTK's
    :func:`bleu` only where a hypothesis is shorter than an n-gram order: NLTK counts at least one guess per
    caption and order, COCO counts none (and smooths zero counts by 1e-15 / 1e-9)."""
    _check_lengths(references, hypotheses)
    guess, correct = [0] * n, [0] * n
    test_length = ref_length = 0
    for refs, hyp in zip(references, hypotheses, strict=True):
        most: Counter[Ngram] = Counter()
        for ref in refs:
            most |= _ngrams(ref, n)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(most[gram], count)
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        test_length += len(hyp)
        ref_length += min((abs(len(ref) - len(hyp)), len(ref)) for ref in refs)[1]
    scores, product = {}, 1.0
    for k in range(n):
        product *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores[f"bleu{k + 1}"] = product ** (1 / (k + 1))
    ratio = (test_length + 1e-15) / (ref_length + 1e-9)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return {key: value * brevity for key, value in scores.items()}


def _ngrams(words: Sequence[str], n: int) -> Counter[Ngram]:
    words = tuple(words)
    return Counter(words[i : i + k] for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_scores(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]],
                   beta: float = 1.2) -> np.ndarray:
    """ROUGE-L per image as the COCO evaluation computes it: the best LCS precision and the best LCS recall over
    the references, combined in an F-measure weighted by ``beta`` (1.2)."""
    _check_lengths(references, hypotheses)
    scores = np.zeros(len(hypotheses))
    for i, (refs, hyp) in enumerate(zip(references, hypotheses, strict=True)):
        if not hyp or not refs:
            continue
        lcs = [_lcs_length(ref, hyp) for ref in refs]
        precision = max(n / len(hyp) for n in lcs)
        recall = max(n / len(ref) if ref else 0.0 for n, ref in zip(lcs, refs, strict=True))
        if precision and recall:
            scores[i] = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return scores


def rouge_l(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus ROUGE-L: the mean over images of :func:`rouge_l_scores` (COCO's definition)."""
    return float(rouge_l_scores(references, hypotheses).mean()) if hypotheses else 0.0



class CiderD:
    """CIDEr-D (Vedantam et al. 2015) as the COCO evaluation computes it (pycocoevalcap's ``Cider``).

    Document frequencies come once from a reference corpus (``references[i]``: the tokenised reference captions
    of image i); :meth:`scores` then scores any hypotheses against their own references cheaply, e.g. as the
    reward of self-critical training. Each n-gram order (1..n) contributes the cosine of TF-IDF vectors with the
    hypothesis weights clipped at the reference's, times a Gaussian penalty on the length difference; the mean
    over orders and references, times 10, is the COCO scale (a perfect caption of a typical set scores ~1–3).
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CIDEr-D needs a reference corpus of at least one image")
        self.n = n
        self.sigma = sigma
        frequency: Counter[Ngram] = Counter()
        for refs in references:
            frequency.update({gram for ref in refs for gram in _ngrams(ref, self.n)})
        self.document_frequency = frequency
        self.log_n_images = math.log(float(len(references)))

    def _vector(self, words: Sequence[str]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        """TF-IDF weights per n-gram order, their norms, and the length COCO uses (its bigram count)."""
        vector: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        for gram, tf in _ngrams(words, self.n).items():
            idf = self.log_n_images - math.log(max(1.0, self.document_frequency.get(gram, 0.0)))
            vector[len(gram) - 1][gram] = tf * idf
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in vector]
        return vector, norms, max(len(words) - 1, 0)  # pycocoevalcap's length counts bigrams, so do we

    def scores(self, hypotheses: Sequence[Sequence[str]],
               references: Sequence[Sequence[Sequence[str]]]) -> np.ndarray:
        """CIDEr-D of each hypothesis against its references, on COCO's scale: shape (n_images,)."""
        _check_lengths(references, hypotheses)
        out = np.zeros(len(hypotheses))
        for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
            if not refs:
                continue
            vec, norm, length = self._vector(hyp)
            total = 0.0
            for ref in refs:
                ref_vec, ref_norm, ref_length = self._vector(ref)
                penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
                for k in range(self.n):
                    dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                    if norm[k] != 0 and ref_norm[k] != 0:
                        dot /= norm[k] * ref_norm[k]
                    total += dot * penalty
            out[i] = total / self.n / len(refs) * 10.0
        return out


def cider_d(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (COCO scale): document frequencies from ``references``, mean of the per-image scores."""
    return float(CiderD(references).scores(hypotheses, references).mean()) if hypotheses else 0.0


def _check_lengths(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")


# ---------------------------------------------------------------------------------------------------------------
# The COCO evaluation: through pycocoevalcap with Java when it can, else our own scorers without METEOR
# ---------------------------------------------------------------------------------------------------------------

COCO_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d")


@dataclass
class CocoScores:
    """COCO caption metrics on the 0–1 scale (CIDEr-D on COCO's own scale), how they were computed, and what
    was skipped and why (``{"meteor": "Java was not found on PATH"}``)."""

    scores: dict[str, float]
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)


def coco_unavailable(java: bool = True) -> str | None:
    """Why the official COCO evaluation (pycocoevalcap with Java) cannot run here, or None if it can."""
    if not java:
        return "Java was turned off (--no-java)"
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install 'satcli[coco]')"
    if shutil.which("java") is None:
        return "Java was not found on PATH (pycocoevalcap runs METEOR and the PTB tokenizer on Java)"
    return None


def coco_metrics(references: Sequence[Sequence[str]], hypotheses: Sequence[str], java: bool = True) -> CocoScores:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of raw captions (``references[i]``: image i's reference captions).

    With pycocoevalcap and Java: the official scorers after the PTB tokenizer. Otherwise :func:`ptb_tokenize`
    and our COCO BLEU, ROUGE-L and CIDEr-D (equal to pycocoevalcap's), and METEOR is skipped with the reason.
    """
    _check_lengths(references, hypotheses)
    reason = coco_unavailable(java)
    if reason is None:
        try:
            return _pycocoevalcap(references, hypotheses)
        except (OSError, ValueError, subprocess.SubprocessError) as error:  # a broken Java install
            reason = f"pycocoevalcap failed ({type(error).__name__}: {str(error).strip()[:120]})"
            log.warning("COCO evaluation: %s; using satcli's scorers without METEOR", reason)
    refs = [[ptb_tokenize(c) for c in captions] for captions in references]
    hyps = [ptb_tokenize(c) for c in hypotheses]
    scores = {**coco_bleu(refs, hyps), "rouge_l": rouge_l(refs, hyps), "cider_d": cider_d(refs, hyps)}
    return CocoScores(scores, "satcli (Python PTB-like tokenizer, no Java)", {"meteor": reason})


@contextlib.contextmanager
def _children_stderr_to_debug_log():
    """pycocoevalcap's PTB tokenizer lets Java write ``PTBTokenizer tokenized N tokens at ...`` straight to the
    stderr it inherits, past ``-q`` and into every log: the child processes started here write into a file
    instead, whose lines go to the debug log (``-v`` shows them)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                log.debug("pycocoevalcap: %s", line)


def _pycocoevalcap(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> CocoScores:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    # One line per caption goes through the jar; an empty caption would drop its line, "." keeps it (and is
    # removed as punctuation).
    with _children_stderr_to_debug_log():
        gts = tokenizer.tokenize({i: [{"caption": c or "."} for c in refs] for i, refs in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": c or "."}] for i, c in enumerate(hypotheses)})
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its BLEU counts
        bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"bleu{k + 1}": float(b) for k, b in enumerate(bleus)})
    meteor = Meteor()
    try:
        scores["meteor"] = float(meteor.compute_score(gts, res)[0])
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider_d"] = float(Cider().compute_score(gts, res)[0])
    return CocoScores(scores, f"pycocoevalcap {importlib.metadata.version('pycocoevalcap')} (PTB tokenizer, Java)")
