"""BioHash on a GPU: hashing 100k context windows, and one learning step on them.

The inputs are the CPU benchmark's (bench/biohash.py: K = 400 units, 40k inputs, windows of 10
Zipf-distributed ids, k = 32) at 100,000 windows. Peers: kexue on the device's default backend
(Triton), kexue's CUDA C++ kernels, the torch reference. Bytes a hash call must move: the 10
gathered columns of K float32 per window and the packed code; the goal is a fraction of the copy
floor (the gather's memory floor).
"""

from __future__ import annotations

import functools

import torch

from bench import biohash as cpu_family
from bench._case import Case, Headline, Peer

WINDOWS = {"smoke": 64, "default": 100_000, "full": 100_000}
FLOOR_GOAL = 0.5
K, WINDOW, V = cpu_family.K, cpu_family.WINDOW, cpu_family.V

HEADLINES = [
    Headline("hash", "reference", "kexue", ">=", 5.0),
    Headline("train", "reference", "kexue", ">=", 5.0),
]


def _peers(mode: str) -> list[Peer]:
    build = cpu_family._kexue_hash if mode == "hash" else cpu_family._kexue_train
    return [Peer("kexue", build("triton")), Peer("kexue-cuda", build("cuda")), Peer("reference", build("torch"))]


def cases(device: torch.device, plan: str) -> list[Case]:
    batch = WINDOWS[plan]
    setup = functools.partial(cpu_family._inputs, batch, device, plan == "smoke")
    params = {"K": K, "N": 2 * V, "window": WINDOW, "k": cpu_family.TOP_K, "windows": batch, "dtype": "fp32"}
    return [
        Case(
            name=f"K{K} N{2 * V} {batch}x{WINDOW}",
            mode="hash",
            bytes=batch * (WINDOW * 4 * K + K // 8),
            setup=setup,
            peers=_peers("hash"),
            headline=True,
            params={**params, "floor_goal": FLOOR_GOAL},
        ),
        Case(
            name=f"K{K} N{2 * V} {batch}x{WINDOW}",
            mode="train",
            bytes=8 * K * 2 * V + batch * WINDOW * 4 * K,
            setup=setup,
            peers=_peers("train"),
            headline=True,
            params=params,
        ),
    ]
