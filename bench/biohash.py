"""BioHash / FlyVec: hashing of context windows and the training step, against their peers.

Inputs (the issue's CPU target): K = 400 hidden units, vocabulary 20k (input N = 40k), windows of
10 tokens (9 context ids in [0, V), the target id in [V, 2V)), k = 32; a batch of B windows
(10,000, FlyVec's default minibatch; 1,000 under --quick). Synapses ~ N(0, 0.02^2), input-major.

Modes:
- ``hash``: the packed codes of B windows (``kexue.ops.biohash``).
- ``train``: one minibatch step of the learning rule on B windows with 1/frequency weights
  (``kexue.ops.biohash_update``), in place; repeated steps keep changing W, which changes nothing
  that is timed (lr is small).
Throughput is B / time (windows per second); the table's bandwidth column uses the bytes below.

Peers, in the same process:
- ``kexue``: the native backend forced (C++ on CPU, Triton on CUDA for ``hash``).
- ``kexue-1thread``: the C++ backend on one thread (CPU only): the fair partner of ``flyvec``,
  whose numpy computation runs on one thread whatever the machine has.
- ``reference``: the float32 torch reference (``kexue.use_backend("torch")``), the oracle's code.
- ``reference-compiled``: ``torch.compile`` of the reference (left out under --quick).
- ``flyvec``: the ``flyvec`` pip package's own binarisation (``FlyVec.get_sparse_embedding``:
  numpy argsort and the midpoint threshold), one window at a time as its API works, fed with the
  window's activations gathered in numpy from the same synapses (``hash`` only; unavailable when
  the package is not installed). The package has no API for the code of a context window: its
  ``get_sparse_embedding(word)`` slices the word's target column out of the (K, 2V) synapses,
  argsorts it and thresholds at the midpoint of the k-th and (k+1)-th values; the bench feeds it
  the window's summed columns instead, which is the same per-window work a user of the package
  would write (a numpy fancy-index gather-sum, then the package's argsort and threshold).

Bytes a call must move: ``hash`` reads 10 columns of K float32 per window and writes 50 code
bytes: ``B * (10 * 4K + K/8)``. ``train`` reads and writes the whole K x N matrix once (the global
max of the update needs every element before any is written, so the C++ path reads it twice):
``8 * K * N`` plus the windows' gathers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import kexue
from bench._case import Case, Headline, Peer, Skipped, Thunk, Unavailable
from kexue.reference import biohash as reference

K, V, WINDOW, TOP_K = 400, 20_000, 10, 32
BATCH, QUICK_BATCH = 10_000, 1_000
LR = 1e-4

HEADLINES = [
    # The goal: kexue's hashing throughput on this machine against the package's. The
    # kexue-1thread row of the table (no goal) shows what is left when both use one thread.
    Headline("hash", "flyvec", "kexue", ">=", 20.0),
    Headline("hash", "reference", "kexue", ">=", 5.0),
    Headline("train", "reference", "kexue", ">=", 5.0),
]


def _inputs(batch: int, device: torch.device, quick: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    synapses = kexue.ops.new_synapses(K, 2 * V, generator=gen)
    # Zipf-like word ids: frequent words are frequent, as in text
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    ids = torch.multinomial(probs / probs.sum(), batch * WINDOW, replacement=True, generator=gen).view(batch, WINDOW)
    counts = torch.bincount(ids.flatten(), minlength=V).double() + 1
    ids[:, WINDOW // 2] += V
    invf = (1.0 / counts)[ids.remainder(V)].float()
    offsets = torch.arange(0, batch * WINDOW + 1, WINDOW)
    return {
        "synapses": synapses.to(device),
        "ids": ids.flatten().to(device),
        "offsets": offsets.to(device),
        "weights": invf.flatten().to(device),
        "windows": ids,
        "quick": quick,
    }


def _kexue_hash(backend: str, threads: int | None = None) -> Callable[[dict], Thunk]:
    """``threads``: run each call on that many threads (``torch.set_num_threads``), restoring the
    run's setting after it; None: the run's setting (all cores by default)."""

    def build(inputs: dict) -> Thunk:
        args = (inputs["ids"], inputs["offsets"], None, inputs["synapses"], TOP_K)
        if threads is not None and inputs["synapses"].device.type != "cpu":
            raise Unavailable("a thread count is a CPU setting")
        try:
            with kexue.use_backend(backend):
                kexue.ops.biohash(*args)
        except kexue.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None

        def call():
            before = torch.get_num_threads()
            if threads is not None:
                torch.set_num_threads(threads)
            try:
                with kexue.use_backend(backend):
                    return kexue.ops.biohash(*args)
            finally:
                torch.set_num_threads(before)

        return call

    return build


def _kexue_train(backend: str) -> Callable[[dict], Thunk]:
    def build(inputs: dict) -> Thunk:
        synapses = inputs["synapses"].t().clone().t()  # a private copy, input-major
        args = (inputs["ids"], inputs["offsets"], inputs["weights"], synapses, LR)
        try:
            with kexue.use_backend(backend):
                kexue.ops.biohash_update(*args)
        except kexue.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None

        def call():
            with kexue.use_backend(backend):
                return kexue.ops.biohash_update(*args)

        return call

    return build


def _reference_compiled(mode: str) -> Callable[[dict], Thunk]:
    def build(inputs: dict) -> Thunk:
        if inputs["quick"]:
            raise Skipped("left out under --quick: compiling the reference takes tens of seconds")
        torch._logging.set_logs(dynamo=logging.ERROR)
        ids, offsets, w = inputs["ids"], inputs["offsets"], inputs["weights"]
        if mode == "hash":
            fn = torch.compile(reference.biohash_sparse)
            synapses = inputs["synapses"]
            return lambda: fn(ids, offsets, None, synapses, TOP_K, True)
        fn = torch.compile(reference.biohash_update_)
        synapses = inputs["synapses"].t().clone().t()
        return lambda: fn(ids, offsets, w, synapses, LR)

    return build


def _flyvec(inputs: dict) -> Thunk:
    try:
        from flyvec.core import FlyVec
    except Exception as exc:  # not installed, or its imports fail
        raise Unavailable(f"the flyvec package is not importable (pip install flyvec): {exc}") from None

    class Activations(FlyVec):
        """The package's binarisation, fed with precomputed activations instead of a token lookup."""

        def __init__(self):  # no model files: nothing is read from disk or the network
            pass

        def is_unknown_token(self, token):
            return False

        def get_dense_embedding(self, act):
            return {"token": None, "id": None, "embedding": act}

    model = Activations()
    wt = inputs["synapses"].t().cpu().numpy()  # (N, K): a window's columns are rows here
    windows = inputs["windows"].numpy()

    def call():
        out = np.empty((windows.shape[0], K), dtype=np.int8)
        for b, ids in enumerate(windows):
            act = wt[ids].sum(axis=0)  # numpy gather-sum of the window's synapse columns
            out[b] = model.get_sparse_embedding(act, hash_length=TOP_K)["embedding"]
        return out

    return call


def _peers(mode: str, device: torch.device) -> list[Peer]:
    native = "triton" if device.type == "cuda" and mode == "hash" else "cpu"
    if mode == "hash":
        return [
            Peer("kexue", _kexue_hash(native)),
            Peer("kexue-1thread", _kexue_hash("cpu", threads=1)),
            Peer("reference", _kexue_hash("torch")),
            Peer("reference-compiled", _reference_compiled(mode)),
            Peer("flyvec", _flyvec),
        ]
    return [
        Peer("kexue", _kexue_train(native)),
        Peer("reference", _kexue_train("torch")),
        Peer("reference-compiled", _reference_compiled(mode)),
    ]


def cases(device: torch.device, quick: bool) -> list[Case]:
    batch = QUICK_BATCH if quick else BATCH
    setup = functools.partial(_inputs, batch, device, quick)
    params = {"K": K, "V": V, "N": 2 * V, "window": WINDOW, "k": TOP_K, "batch": batch, "dtype": "fp32"}
    return [
        Case(
            name=f"K{K} N{2 * V} {batch}x{WINDOW} k{TOP_K}",
            mode="hash",
            bytes=batch * (WINDOW * 4 * K + K // 8),
            setup=setup,
            peers=_peers("hash", device),
            headline=True,
            params=params,
        ),
        Case(
            name=f"K{K} N{2 * V} {batch}x{WINDOW}",
            mode="train",
            bytes=8 * K * 2 * V + batch * WINDOW * 4 * K,
            setup=setup,
            peers=_peers("train", device),
            headline=True,
            params=params,
        ),
    ]


def headline_timing(batch: int = BATCH, rounds: int = 9) -> None:
    """The hash case timed directly against the flyvec package: ``rounds`` rounds, each calling
    kexue on one thread, kexue on the run's threads and the package once, in turn (a slow spell of
    a shared machine then hits every peer); medians and the per-round ratios are printed. A short
    way to the flyvec headline when the family's full bench (torch.compile, training) is too long."""
    import statistics
    import time

    inputs = _inputs(batch, torch.device("cpu"), False)
    fns = {
        "kexue-1thread": _kexue_hash("cpu", threads=1)(inputs),
        "kexue": _kexue_hash("cpu")(inputs),
        "flyvec": _flyvec(inputs),
    }
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in samples.items()}
    print(f"K={K} N={2 * V} {batch}x{WINDOW} k={TOP_K} fp32, {torch.get_num_threads()} threads:")
    for name, t in med.items():
        print(f"  {name:14s} {t * 1e3:8.2f} ms  {t / batch * 1e6:6.2f} us/window  {batch / t:12,.0f} windows/s")
    for name in ("kexue-1thread", "kexue"):
        per = sorted(f / k for f, k in zip(samples["flyvec"], samples[name], strict=False))
        print(
            f"  flyvec / {name}: {med['flyvec'] / med[name]:.1f}x (per round {per[0]:.1f} .. "
            f"{statistics.median(per):.1f} .. {per[-1]:.1f}x; goal >= 20x)"
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.biohash", description=headline_timing.__doc__)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    headline_timing(args.batch, args.rounds)
