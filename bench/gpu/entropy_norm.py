"""Entropy normalization on a GPU: a (4096, 128k) bf16 logits tensor, as an LLM's vocabulary.

kexue's ``entropy_normalize(x, target, logits=True)`` against ``torch.softmax`` over the same
tensor, the yardstick: both read each row once and write it once (2 bytes each way in bf16), and
entropy normalization's Newton iterations run on a row already on chip. Goal: within 2x of
softmax's time, and a fraction of the copy floor.
"""

from __future__ import annotations

import functools
import math

import torch

import kexue
from bench._case import Case, Headline, Peer, Thunk, Unavailable

SHAPES = {"smoke": [(8, 3000)], "default": [(4096, 131072)], "full": [(4096, 131072), (16384, 32768)]}
FLOOR_GOAL = 0.5

HEADLINES = [Headline("forward", "kexue", "softmax", "<=", 2.0)]


def _inputs(rows: int, n: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(rows, n, generator=gen, device=device) * 2).to(torch.bfloat16)
    target = (0.1 + 0.8 * torch.rand(rows, generator=gen, device=device)) * math.log(n)
    return {"x": x, "target": target}


def _kexue(backend: str | None):
    def build(inputs: dict) -> Thunk:
        x, target = inputs["x"], inputs["target"]

        def call():
            if backend is None:
                return kexue.ops.entropy_normalize(x, target, logits=True)
            with kexue.use_backend(backend):
                return kexue.ops.entropy_normalize(x, target, logits=True)

        try:
            call()
        except kexue.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None
        return call

    return build


def _softmax(inputs: dict) -> Thunk:
    x = inputs["x"]
    return lambda: torch.softmax(x, -1)


PEERS = [Peer("kexue", _kexue(None)), Peer("kexue-cuda", _kexue("cuda")), Peer("softmax", _softmax)]


def cases(device: torch.device, plan: str) -> list[Case]:
    return [
        Case(
            name=f"{rows}x{n} bf16 logits",
            mode="forward",
            bytes=2 * 2 * rows * n,
            peers=PEERS,
            headline=i == 0,
            setup=functools.partial(_inputs, rows, n, device),
            params={"rows": rows, "n": n, "dtype": "bf16", "floor_goal": FLOOR_GOAL},
        )
        for i, (rows, n) in enumerate(SHAPES[plan])
    ]
