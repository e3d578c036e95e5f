"""Lion and Tiger on a GPU: one optimizer step over a transformer's parameters.

The parameters are those of a GPT-style model (token embedding, then per layer: fused QKV,
attention output, two MLP matrices, their biases and two LayerNorms), fp32 with fp32 gradients:
16 layers of width 1536 is about 530M parameters in 195 tensors (``full`` adds 1.3B in 291).

Peers: ``kexue`` (the device's default backend), ``torch.optim.AdamW(fused=True)`` (the
throughput reference of optimizer steps), lion-pytorch and pytorch-optimizer when installed, and
``reference-compiled`` (the plain-PyTorch step under torch.compile, ``full`` only: compiling it
over hundreds of tensors takes minutes). Bytes an element must move: Lion and Tiger read the
param, grad and momentum and write the param and momentum, 20 bytes in fp32; the goal is a
fraction of the copy floor.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bench import sign_optim as cpu_family
from bench._case import Case, Headline, Peer
from kexue.optim import Lion, Tiger

FLOOR_GOAL = 0.85
BYTES_PER_PARAM = 20  # fp32 param, grad, momentum: read 3, write 2
# (layers, width, vocabulary)
MODELS = {"smoke": [(2, 32, 100)], "default": [(16, 1536, 50257)], "full": [(16, 1536, 50257), (24, 2048, 50257)]}

HEADLINES = [
    Headline("lion", "kexue", "adamw-fused", "<=", 1 / 1.5),
    Headline("tiger", "kexue", "adamw-fused", "<=", 1 / 1.5),
]


def transformer_shapes(layers: int, width: int, vocab: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [
            (3 * width, width),
            (3 * width,),
            (width, width),
            (width,),
            (4 * width, width),
            (4 * width,),
            (width, 4 * width),
            (width,),
            (width,),
            (width,),
            (width,),
            (width,),
        ]
    return shapes + [(width,), (width,)]


def _inputs(shapes: list[tuple[int, ...]], device: torch.device, smoke: bool) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(1)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen, device=device) * 0.02).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return {"params": params, "quick": smoke}


def _peers(mode: str, device: torch.device, plan: str) -> list[Peer]:
    """The CPU family's peers (kexue on the device's default backend, AdamW, the packages, the
    reference), plus kexue's CUDA C++ step."""
    peers = [p for p in cpu_family._peers(mode, {}, device) if plan == "full" or p.name != "reference-compiled"]
    cls = Lion if mode == "lion" else Tiger
    return peers[:1] + [Peer("kexue-cuda", cpu_family._kexue(cls, {}, "cuda"))] + peers[1:]


def cases(device: torch.device, plan: str) -> list[Case]:
    out = []
    for i, (layers, width, vocab) in enumerate(MODELS[plan]):
        shapes = transformer_shapes(layers, width, vocab)
        total = sum(torch.Size(s).numel() for s in shapes)
        for mode in ("lion", "tiger"):
            out.append(
                Case(
                    name=f"{total / 1e6:.0f}M params in {len(shapes)} tensors fp32",
                    mode=mode,
                    bytes=BYTES_PER_PARAM * total,
                    peers=_peers(mode, device, plan),
                    headline=i == 0,
                    setup=functools.partial(_inputs, shapes, device, plan == "smoke"),
                    params={
                        "params": total,
                        "tensors": len(shapes),
                        "layers": layers,
                        "width": width,
                        "floor_goal": FLOOR_GOAL,
                    },
                )
            )
    return out
