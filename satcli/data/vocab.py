"""The caption vocabulary: words ↔ integer ids, with four special tokens at fixed ids."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)


@dataclass
class Vocabulary:
    """An ordered word list; a word's id is its position. Ids 0–3 are ``<pad> <start> <end> <unk>``."""

    words: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("a vocabulary must not repeat a word")
        self._index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_freq: int = 5) -> Vocabulary:
        """Words seen at least ``min_freq`` times, most frequent first (ties alphabetical, so builds repeat)."""
        counts = Counter(word for tokens in captions for word in tokens)
        kept = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def id(self, word: str) -> int:
        return self._index.get(word, UNK_ID)

    def encode(self, tokens: Sequence[str], max_length: int | None = None) -> list[int]:
        """``<start> w1 … wn <end>`` as ids; words beyond ``max_length`` are cut (the ``<end>`` stays)."""
        words = tokens if max_length is None else tokens[:max_length]
        return [START_ID, *(self.id(w) for w in words), END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words for ids, stopping at ``<end>`` and leaving out ``<start>`` and ``<pad>``."""
        words = []
        for i in ids:
            if i == END_ID:
                break
            if i not in (START_ID, PAD_ID):
                words.append(self.words[i])
        return words

    def to_list(self) -> list[str]:
        """Plain list of words, safe to store in a ``weights_only`` checkpoint or JSON."""
        return list(self.words)


def banned_words(allow_unk: bool) -> tuple[int, ...]:
    """The word ids ``caption`` and ``evaluate`` never write: ``<unk>``, unless allowed."""
    return () if allow_unk else (UNK_ID,)
