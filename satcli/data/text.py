"""Caption tokenisation, the same for references and predictions.

The rule, applied to every caption satcli reads or writes:

1. Unicode-normalise (NFKC) and lower-case.
2. Keep runs of letters and digits as words; an apostrophe inside a word stays with it (``dog's``).
3. Drop everything else: punctuation and symbols are not words (this matches the tokens of the
   Karpathy split files and what the COCO evaluation's PTB tokenizer keeps).

``"A dog, running on the beach!"`` → ``["a", "dog", "running", "on", "the", "beach"]``.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(caption: str) -> list[str]:
    """Split a raw caption into lower-case word tokens (see the module docstring for the rule)."""
    text = unicodedata.normalize("NFKC", caption).lower().replace("\u2019", "'")
    return _WORD.findall(text)


def detokenize(tokens: list[str]) -> str:
    """Join tokens into the caption string shown to users."""
    return " ".join(tokens)
