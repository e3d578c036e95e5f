"""Context hashes: a word's code read from the hashed windows it occurs in, not from its column.

A static hash (:meth:`FlyVec.word_hashes`) is the code of an input holding the target word alone:
the ``k`` units most active for its target synapse column. On a small corpus a word is seen 5-50
times and its target column is close to a random mix of its few windows' winners, so those codes
rank word pairs poorly (WordSim353 +0.10 on gensim's Wikipedia extract, docs/flyvec.md). What the
network did learn is which units win which windows (it is trained on whole windows), and words
used in the same contexts share those winners. A word's context hash is built from that:

1. every window of the corpus is hashed as in training (context ids and the target shifted by V,
   each weighted by its inverse frequency; stop words weigh 0): ``k`` units per window;
2. a word's profile counts how often each unit is in the codes of the windows it is the target of;
3. with ``contexts=N``, only its N most typical windows vote: those whose codes overlap its profile
   most (its usual use, not its one-off ones); by default every window of the word votes;
4. its code is the ``k`` units with the most votes relative to how often the unit wins a window
   of the corpus at all: ``votes / rate``, the pointwise mutual information of word and unit up to
   a per-word constant, ties to the lower index. Without the division, the few units that win a
   third of all windows would be in nearly every word's code (WordSim353 +0.13 instead of +0.25).

A word that is the target of no window (it occurs only in sentences shorter than a window) keeps
its static hash. The codes are ordinary packed ``k``-hot codes: Hamming distance, nearest
neighbours and :func:`kexue.ops.hamming_topk` work on them as on static ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

import kexue.ops
from kexue._biohash_codes import pack_bits
from kexue.flyvec.model import FlyVec
from kexue.flyvec.tokenize import read_sentences
from kexue.flyvec.windows import context_windows, target_ids

_CHUNK = 1 << 15  # windows hashed at a time: bounds the (chunk, K) activations


def window_weights(model: FlyVec) -> torch.Tensor:
    """Per vocabulary id, the input weight of training: 1/frequency, 0 for the model's stop words."""
    weights = model.vocabulary.inverse_frequency().float()
    for word in model.config.get("stop_words", ()):
        if word in model.vocabulary:
            weights[model.vocabulary.id(word)] = 0.0
    return weights


def window_codes(model: FlyVec, windows: torch.Tensor, k: int) -> torch.Tensor:
    """``(M, K)`` uint8 0/1: the ``k``-hot code of every window, hashed as in training."""
    V = len(model.vocabulary)
    weights = window_weights(model)
    out = torch.empty(windows.shape[0], model.num_hidden, dtype=torch.uint8)
    for start in range(0, windows.shape[0], _CHUNK):
        x = windows[start : start + _CHUNK].long()
        w = weights[x.remainder(V)]
        out[start : start + x.shape[0]] = kexue.ops.biohash(x, None, w, model.synapses, k, packed=False)
    return out


def context_hashes_from_windows(
    model: FlyVec, windows: torch.Tensor, contexts: int | None = None, k: int | None = None
) -> torch.Tensor:
    """Context hashes of every vocabulary id, ``(V, ceil(K/8))`` uint8, from ``windows (M, size)``
    (:func:`kexue.flyvec.context_windows` of the corpus, centre shifted by V); see the module
    docstring. ``contexts``: how many of a word's most typical windows vote (None: all of them);
    ``k``: bits per code (default: the model's hash length)."""
    if contexts is not None and (isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1):
        raise ValueError(f"contexts must be a positive int or None, got {contexts!r}")
    k = model._k(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.num_hidden:
        raise ValueError(f"k must be an int in [1, {model.num_hidden}], got {k!r}")
    if windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"windows must be a 2-D int32/int64 tensor, got {windows.dtype} {tuple(windows.shape)}")
    V, K = len(model.vocabulary), model.num_hidden
    targets = target_ids(windows, V)
    if windows.numel() and not (bool((targets >= 0).all()) and bool((targets < V).all())):
        raise ValueError("windows must have their centre shifted by V (context_windows(..., len(vocabulary)))")
    codes = window_codes(model, windows, k)
    profile = torch.zeros(V, K, dtype=torch.float32).index_add_(0, targets, codes.float())

    votes = profile if contexts is None else _typical_votes(codes, targets, profile, contexts)
    # A unit's share of all windows; +1 keeps a unit that never won finite (it has no votes).
    rate = (profile.sum(0) + 1.0) / (windows.shape[0] + 1.0)
    winners = torch.argsort(votes / rate, dim=1, descending=True, stable=True)[:, :k]  # equal: lower index
    mask = torch.zeros(V, K, dtype=torch.bool).scatter_(1, winners, True)
    hashes = pack_bits(mask)
    unseen = votes.sum(1) == 0  # no window has this word as its target: keep the static hash
    if bool(unseen.any()):
        hashes[unseen] = model.word_hashes(k)[unseen]
    return hashes


def _typical_votes(codes: torch.Tensor, targets: torch.Tensor, profile: torch.Tensor, contexts: int) -> torch.Tensor:
    """``(V, K)`` votes of each word's ``contexts`` most typical windows (the largest overlap of
    a window's code with its target's profile; equal overlaps: the earlier window)."""
    typical = torch.empty(codes.shape[0], dtype=torch.float32)
    for start in range(0, codes.shape[0], _CHUNK):
        stop = start + _CHUNK
        typical[start:stop] = (codes[start:stop].float() * profile[targets[start:stop]]).sum(1)
    # Windows grouped by target, the most typical first in each group; keep the first `contexts`.
    order = torch.argsort(typical, descending=True, stable=True)
    order = order[torch.argsort(targets[order], stable=True)]
    grouped = targets[order]
    group_start = torch.searchsorted(grouped, grouped, right=False)
    chosen = order[torch.arange(order.shape[0]) - group_start < contexts]
    return torch.zeros_like(profile).index_add_(0, targets[chosen], codes[chosen].float())


def context_hashes(
    model: FlyVec,
    corpus: str | os.PathLike | Iterable[str],
    contexts: int | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """Context hashes of every vocabulary id from a corpus (a text file, one sentence a line, or
    an iterable of lines), cut into windows of the model's training size."""
    size = int(model.config.get("window", 11))
    sentences = (model.vocabulary.encode(s) for s in read_sentences(corpus))
    windows = context_windows(sentences, len(model.vocabulary), size)
    if windows.shape[0] == 0:
        raise ValueError(f"the corpus has no sentence of at least window = {size} tokens")
    return context_hashes_from_windows(model, windows, contexts, k)
