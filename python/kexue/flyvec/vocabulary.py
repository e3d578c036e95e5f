"""The vocabulary: words, their corpus counts, and the word <-> id maps.

Id 0 is ``<UNK>`` (as in FlyVec's released model), standing for every word below the minimum
count; its count is the number of such tokens. The other words are ordered by count, most
frequent first, ties alphabetically, so the same corpus always gives the same ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

UNK = "<UNK>"


@dataclass
class Vocabulary:
    """``words[i]`` has id i and ``counts[i]`` occurrences in the training corpus."""

    words: list[str]
    counts: torch.Tensor  # (V,) int64
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        if not self.words or self.words[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r} at id 0")
        if self.counts.shape != (len(self.words),):
            raise ValueError(f"counts must have one entry per word ({len(self.words)}), got {tuple(self.counts.shape)}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be unique")

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index and self.index[word] != 0

    def id(self, word: str) -> int:
        """The id of ``word``, 0 (``<UNK>``) when it is not in the vocabulary."""
        return self.index.get(word, 0)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.index.get(t, 0) for t in tokens]

    def inverse_frequency(self) -> torch.Tensor:
        """``1 / count`` per id (0 for a count of 0), float64: FlyVec's ``1/p`` input scaling. The
        absolute scale does not matter: every step is normalized to a largest change of lr."""
        c = self.counts.double()
        return torch.where(c > 0, 1.0 / c.clamp_min(1), 0.0)


def build_vocabulary(sentences: Iterable[Sequence[str]], min_count: int = 5, max_size: int | None = None) -> Vocabulary:
    """Count the words of ``sentences`` and keep those seen at least ``min_count`` times (at most
    ``max_size`` words besides ``<UNK>``, the most frequent)."""
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    counter: Counter[str] = Counter()
    for s in sentences:
        counter.update(s)
    if not counter:
        raise ValueError("the corpus is empty: no tokens to build a vocabulary from")
    kept = sorted((w for w, c in counter.items() if c >= min_count and w != UNK), key=lambda w: (-counter[w], w))
    if max_size is not None:
        kept = kept[:max_size]
    if not kept:
        raise ValueError(
            f"no word occurs at least min_count={min_count} times "
            f"(the most frequent occurs {counter.most_common(1)[0][1]} times)"
        )
    kept_set = set(kept)
    unknown = sum(c for w, c in counter.items() if w not in kept_set)
    counts = torch.tensor([unknown] + [counter[w] for w in kept], dtype=torch.int64)
    return Vocabulary([UNK] + kept, counts)
