"""Helpers shared by the biohash test modules: random inputs, brute-force oracles, toy corpora."""

from __future__ import annotations

import random

import torch

import kexue
from kexue import flyvec

TOPICS = [
    "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "car bus train truck bike boat plane ship taxi tram".split(),
    "red blue green yellow purple orange pink brown black white".split(),
]


def topic_corpus(sentences: int = 240, length: int = 9, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = rng.choice(TOPICS)
        lines.append(" ".join(rng.choice(words) for _ in range(length)))
    return lines


SMALL = flyvec.TrainConfig(hidden=24, window=5, epochs=4, batch_size=64, lr=0.05, min_count=2, hash_length=4)
NATIVE = kexue.backends()["cpu"]["available"]
CPU_BACKENDS = ["cpu", "torch"] if NATIVE else ["torch"]


def random_batch(
    rows: int,
    num_inputs: int,
    min_len: int = 1,
    max_len: int = 12,
    generator=None,
    weighted: bool = True,
    dtype=torch.float64,
):
    """CSR rows of random ids (repeats allowed) with positive weights."""
    g = generator or torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    nnz = int(offsets[-1])
    ids = torch.randint(0, num_inputs, (nnz,), generator=g)
    w = (0.1 + torch.rand(nnz, generator=g, dtype=torch.float64)).to(dtype) if weighted else None
    return ids, offsets, w


def tied_synapses(num_hidden: int, num_inputs: int, dtype, generator=None) -> torch.Tensor:
    """Synapses with few distinct values (multiples of 1/4 in [-1, 1]): activations tie often, and
    every sum of a few of them is exact in every dtype, so ties are real ties everywhere."""
    g = generator or torch.Generator().manual_seed(1)
    values = torch.randint(-4, 5, (num_inputs, num_hidden), generator=g).to(torch.float64) / 4
    return values.to(dtype).t()  # input-major (K, N)


def brute_topk_mask(act: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k winners per row by sorting (-activation, index) pairs in Python."""
    mask = torch.zeros(act.shape, dtype=torch.bool)
    for b, row in enumerate(act.tolist()):
        order = sorted(range(len(row)), key=lambda mu: (-row[mu], mu))
        mask[b, order[:k]] = True
    return mask


def brute_pack(mask: torch.Tensor) -> torch.Tensor:
    nb = (mask.shape[1] + 7) // 8
    out = torch.zeros(mask.shape[0], nb, dtype=torch.uint8)
    for b in range(mask.shape[0]):
        for mu in range(mask.shape[1]):
            if mask[b, mu]:
                out[b, mu // 8] += 1 << (mu % 8)
    return out


def run(backend, fn, *args, **kwargs):
    with kexue.use_backend(backend):
        return fn(*args, **kwargs)


def toy_corpus(generator, vocab=30, topics=3, sentences=120, length=12):
    """Sentences drawn from a few topics, each topic a distinct slice of the vocabulary."""
    per = vocab // topics
    out = []
    for _ in range(sentences):
        t = int(torch.randint(0, topics, (1,), generator=generator))
        out.append(torch.randint(t * per, (t + 1) * per, (length,), generator=generator))
    return out


def windows(sentences, vocab, size=5):
    """FlyVec inputs: context ids in [0, V), the centre word shifted to [V, 2V)."""
    rows = []
    for s in sentences:
        for i in range(len(s) - size + 1):
            win = s[i : i + size].clone()
            win[size // 2] += vocab
            rows.append(win)
    return torch.stack(rows)
