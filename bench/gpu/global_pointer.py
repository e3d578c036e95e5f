"""GlobalPointer on a GPU: the fused loss against the materializing einsum + dense loss.

Efficient GlobalPointer at the issue's size: q, k ``(16, 512, 64)`` bf16, start/end biases for 16
types, a ragged padding mask, ~4 gold spans per (sample, type); the loss and its gradients with
respect to q, k and both biases (``full``), and the loss alone (``forward``). The inputs and the
peers are the CPU benchmark's (bench/global_pointer.py): kexue on the device's default backend,
the reference (einsum scores, masks, dense multilabel cross-entropy) eager and compiled; here also
kexue's CUDA C++ kernels. Peak memory is the column to read beside time: the reference holds
several ``(B, T, L, L)`` tensors.
"""

from __future__ import annotations

import functools

import torch

from bench import global_pointer as cpu_family
from bench._case import Case, Headline, Peer, Thunk, Unavailable

# (B, L, T, d)
SHAPES = {"smoke": [(2, 40, 3, 16)], "default": [(16, 512, 16, 64)], "full": [(16, 512, 16, 64), (8, 1024, 16, 64)]}

HEADLINES = [
    Headline("full", "reference", "kexue", ">=", 10.0),
    Headline("full", "reference-compiled", "kexue", ">=", 3.0),
]


def _kexue_cuda(inputs: dict) -> Thunk:
    import kexue

    try:
        with kexue.use_backend("cuda"):
            cpu_family._in_mode(inputs, cpu_family.kexue_loss)
    except kexue.BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None

    def call():
        with kexue.use_backend("cuda"):
            return cpu_family._in_mode(inputs, cpu_family.kexue_loss)

    return call


def _peers(plan: str) -> list[Peer]:
    peers = [Peer(name, build) for name, build in cpu_family.PEERS.items()]
    return peers[:1] + [Peer("kexue-cuda", _kexue_cuda)] + peers[1:]


def cases(device: torch.device, plan: str) -> list[Case]:
    out = []
    for i, (b, length, types, d) in enumerate(SHAPES[plan]):
        for mode in ("full", "forward"):
            elem = 2
            moved = (2 * b * length * d + 2 * b * length * types) * elem * (2 if mode == "full" else 1)
            out.append(
                Case(
                    name=f"B{b} L{length} T{types} d{d} bf16",
                    mode=mode,
                    bytes=moved,
                    peers=_peers(plan),
                    headline=i == 0,
                    setup=functools.partial(
                        cpu_family.make_inputs, b, length, types, d, torch.bfloat16, device, mode, plan == "smoke"
                    ),
                    params={"batch": b, "length": length, "types": types, "head_size": d, "dtype": "bf16"},
                )
            )
    return out
