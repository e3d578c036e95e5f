"""Word-similarity evaluation: Spearman correlation between a model's similarities and human scores.

Pair files are the usual tab-separated ``word1<TAB>word2<TAB>score`` lines with ``#`` comments
(WordSim353 and SimLex-999 as shipped in gensim's test data). Pairs with a word outside the
vocabulary are left out and counted, so two models can be compared on the same pairs.

A FlyVec model's similarity of two words is minus the Hamming distance of their static hashes
(``similarity="hash"``) or of their context hashes (``similarity="context-hash"``, voted by the
windows of a corpus: :mod:`kexue.flyvec.context`), or the cosine of their dense static
embeddings, the target-half synapse columns ``W[:, V + id]`` (``similarity="dense"``,
flyvec/core.py's dense embedding).
Codes have exactly k ones, so minus the Hamming distance is ``2 * overlap - 2k``: ranking by it is
ranking by overlap. Tied similarities share their average rank.

What to expect on a small corpus (the Wikipedia extract in gensim's test data: 461k tokens, 245k
windows, 8,615 words; tests/biohash/test_eval.py; 234 WordSim353 and 493 SimLex-999 pairs in the
vocabulary, the same pairs for every model; docs/flyvec.md has the table):

- FlyVec's own settings (10,000 windows a batch, lr 0.002) leave the synapses at their random
  init (even 1,000 a batch at lr 0.01: the target half still correlates 0.84 with it after 15
  epochs) and Spearman ~0: every step moves a weight by at most lr, and a word's target column
  gets 1/count of its windows' mass, so the corpus must give many steps.
- The "small" preset (1,000 a batch, lr 0.1, 15 epochs) trains: WordSim353 +0.154 with dense
  similarity (95% interval +0.02..+0.28), +0.098 with the static hashes, against Word2Vec's +0.290
  and a PPMI count model's +0.135 on the same text and pairs; SimLex-999 +0.04 / +0.03 / +0.10.
- The static hashes are the weak part: a static code is the k most active units for the target
  column alone, which on a word seen 5-50 times is close to a random mix of its few windows'
  winners. Masking stop words (the busiest unit's share of the windows falls from 36% to 16%) and
  hash lengths from 10 to 300 did not change that beyond the interval.
- Context hashes of the same model, codes of the same size voted by the windows each word occurs
  in, reach WordSim353 +0.254 (95% +0.13..+0.37) and SimLex-999 +0.121: above the count model,
  within the interval of Word2Vec.
- Intervals: on n pairs Spearman's standard error is about 1.03/sqrt(n - 3), 0.07 for 234
  pairs; differences below ~0.15 between two models on WordSim353 are noise (:attr:`Score.ci95`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kexue.flyvec.model import FlyVec


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """``(word1, word2, score)`` of a tab-separated pair file, lower-cased."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            try:
                score = float(fields[2])
                pairs.append((fields[0].lower(), fields[1].lower(), score))
            except (IndexError, ValueError):
                raise ValueError(
                    f"{os.fspath(path)}:{number}: expected 'word1<TAB>word2<TAB>score', got {line!r}"
                ) from None
            if not math.isfinite(score):
                raise ValueError(f"{os.fspath(path)}:{number}: the score must be a finite number, got {fields[2]!r}")
    if not pairs:
        raise ValueError(f"{os.fspath(path)} holds no word pairs")
    return pairs


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x`` (float64), tied values sharing their average rank."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    r = torch.empty(x.shape[0], dtype=torch.float64)
    i, n = 0, x.shape[0]
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks)."""
    ra, rb = ranks(torch.tensor(a, dtype=torch.float64)), ranks(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


@dataclass(frozen=True)
class Score:
    spearman: float
    pairs: int  # pairs evaluated
    skipped: int  # pairs with a word outside the vocabulary

    def why_undefined(self) -> str | None:
        """Why :attr:`spearman` is NaN (None when it is a number)."""
        if not math.isnan(self.spearman):
            return None
        if self.pairs < 2:
            return f"only {self.pairs} pair(s) have both words in the vocabulary"
        return "the model's similarities (or the scores) are all equal: no ranking to correlate"

    @property
    def ci95(self) -> tuple[float, float]:
        """An approximate 95% interval of the Spearman correlation: Fisher's z with the standard
        error ``1.03 / sqrt(n - 3)`` of Fieller, Hartley and Pearson (1957). On a few hundred pairs
        it is about +-0.1 wide: smaller differences between two models say little."""
        if self.pairs < 4 or math.isnan(self.spearman):
            return (float("nan"), float("nan"))
        z = math.atanh(max(-0.999999, min(0.999999, self.spearman)))
        half = 1.96 * 1.03 / math.sqrt(self.pairs - 3)
        return (math.tanh(z - half), math.tanh(z + half))


def evaluate_pairs(
    pairs: list[tuple[str, str, float]], known: Callable[[str], bool], similarity: Callable[[str, str], float]
) -> Score:
    kept = [(a, b, s) for a, b, s in pairs if known(a) and known(b)]
    if len(kept) < 2:
        return Score(float("nan"), len(kept), len(pairs) - len(kept))
    model_sims = [similarity(a, b) for a, b, _ in kept]
    bad = next(((a, b, x) for (a, b, _), x in zip(kept, model_sims, strict=True) if not math.isfinite(x)), None)
    if bad is not None:
        raise ValueError(
            f"the model's similarity of {bad[0]!r} and {bad[1]!r} is {bad[2]}: its synapses are not "
            "finite (trained with an infinite lr or delta?)"
        )
    return Score(spearman(model_sims, [s for _, _, s in kept]), len(kept), len(pairs) - len(kept))


SIMILARITIES = ("hash", "dense", "context-hash")


def _hamming_similarity(model: FlyVec, codes: torch.Tensor) -> Callable[[str, str], float]:
    from kexue._biohash_codes import hamming_distances

    def sim(a: str, b: str) -> float:
        ia, ib = model.vocabulary.id(a), model.vocabulary.id(b)
        return -float(hamming_distances(codes[ia : ia + 1], codes[ib : ib + 1])[0, 0])

    return sim


def flyvec_similarity(
    model: FlyVec,
    kind: str = "hash",
    k: int | None = None,
    corpus=None,
    contexts: int | None = None,
) -> Callable[[str, str], float]:
    """The similarity function of a FlyVec model (see the module docstring). ``"context-hash"``
    needs the ``corpus`` (a file or lines) whose windows vote the codes, ``contexts`` a word
    (:func:`kexue.flyvec.context.context_hashes`)."""
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(map(repr, SIMILARITIES))}, got {kind!r}")
    if kind == "hash":
        return _hamming_similarity(model, model.word_hashes(k))
    if kind == "context-hash":
        from kexue.flyvec.context import context_hashes

        if corpus is None:
            raise ValueError("similarity 'context-hash' needs the corpus its windows come from (corpus=)")
        codes = context_hashes(model, corpus, contexts, k)
        return _hamming_similarity(model, codes)
    emb = torch.nn.functional.normalize(model.synapses[:, len(model.vocabulary) :].t().double(), dim=1)

    def sim(a: str, b: str) -> float:
        return float(emb[model.vocabulary.id(a)] @ emb[model.vocabulary.id(b)])

    return sim


def evaluate(
    model: FlyVec,
    pair_file: str | os.PathLike,
    similarity: str | Callable[[str, str], float] = "hash",
    k: int | None = None,
    corpus=None,
    contexts: int | None = None,
) -> Score:
    """Spearman correlation of ``model`` on a pair file; ``similarity`` is a kind (see
    :func:`flyvec_similarity`) or a function made by it once for several pair files."""
    sim = similarity if callable(similarity) else flyvec_similarity(model, similarity, k, corpus, contexts)
    return evaluate_pairs(read_pairs(pair_file), model.vocabulary.__contains__, sim)
