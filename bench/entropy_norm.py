"""Entropy normalization: ``kexue.ops.entropy_normalize`` against its peers.

Inputs: rows of probabilities ``softmax(2 * randn)`` and a random per-row target entropy in
``(0.1, 0.9) * log n``, so that rows need different numbers of Newton iterations.

Peers, in the same process:
- ``kexue``: the native backend of the device (C++ on CPU, Triton on CUDA), forced, so that a
  missing build is reported as unavailable instead of timing the fallback under kexue's name.
- ``kexue-cuda`` (CUDA only): the CUDA C++ kernels.
- ``softmax``: ``torch.softmax`` on the same tensor, the yardstick. It also reads each row once and
  writes it once; entropy normalization adds a few passes (Newton iterations) over a row that is
  already in cache, so the goal is at most 3x softmax's time.
- ``reference``: the same Newton iterations in plain PyTorch (``kexue.use_backend("torch")``);
  the goal is at least 4x faster.
- ``reference-compiled``: ``torch.compile`` of the reference's forward and backward functions.

Bytes the op must move: forward reads x and writes y, ``2 * R * n * elem`` (the per-row target
and gamma are negligible). Forward and backward add reading grad_y and x (y is rebuilt from x and
two per-row statistics) and writing grad_x: ``5 * R * n * elem``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

import kexue
from bench import Case, Headline, Peer, Skipped, Unavailable
from bench._case import Thunk
from kexue.reference import entropy_norm as reference

MAX_ITER = 20  # the public default
MODES = ("forward", "full")
# (rows, n, dtype); the first is the target case and the headline case.
SHAPES = [
    (4096, 4096, torch.float32),
    (65536, 128, torch.float32),
    (256, 32768, torch.float32),
    (4096, 4096, torch.bfloat16),
]
QUICK_SHAPES = [(256, 256, torch.float32), (64, 1000, torch.bfloat16)]
BYTES_PER_ELEMENT_MOVED = {"forward": 2, "full": 5}  # in units of the element size, see above
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

HEADLINES = [
    Headline("forward", "kexue", "softmax", "<=", 3.0),
    Headline("forward", "reference", "kexue", ">=", 4.0),
]


def _inputs(rows: int, n: int, dtype: torch.dtype, device: torch.device, mode: str, quick: bool) -> dict:
    gen = torch.Generator().manual_seed(0)  # the same data on every device
    x = torch.softmax(torch.randn(rows, n, generator=gen) * 2, -1).to(device=device, dtype=dtype)
    target = ((0.1 + 0.8 * torch.rand(rows, generator=gen)) * math.log(n)).to(device)
    inputs: dict[str, Any] = {"x": x, "target": target, "mode": mode, "quick": quick}
    if mode == "full":
        x.requires_grad_()
        inputs["grad_y"] = torch.randn(rows, n, generator=gen).to(device=device, dtype=dtype)
    return inputs


def _in_mode(inputs: dict, forward: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """One call in the case's mode: ``forward(x)``, or that and its backward through autograd."""
    x = inputs["x"]
    y = forward(x)
    if inputs["mode"] == "forward":
        return y
    # autograd.grad rather than backward(): nothing accumulates into x.grad across calls.
    return torch.autograd.grad(y, x, inputs["grad_y"])


def _kexue_peer(name: str, backend: str) -> Peer:
    """``entropy_normalize`` with ``backend`` forced for the forward and the backward."""

    def build(inputs: dict) -> Thunk:
        x, target = inputs["x"], inputs["target"]
        try:  # a one-row call tells whether the backend serves this device and dtype
            with kexue.use_backend(backend):
                kexue.ops.entropy_normalize(x[:1].detach(), target[:1])
        except kexue.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None

        def normalize(rows: torch.Tensor) -> torch.Tensor:
            return kexue.ops.entropy_normalize(rows, target, max_iter=MAX_ITER)

        def call():
            with kexue.use_backend(backend):
                return _in_mode(inputs, normalize)

        return call

    return Peer(name, build)


def _softmax(inputs: dict) -> Thunk:
    return lambda: _in_mode(inputs, lambda rows: torch.softmax(rows, -1))


@functools.cache
def _compiled_reference() -> tuple[Callable, Callable]:
    """One compiled pair for every case, so that later shapes reuse (or recompile dynamic) code."""
    # The reference's data-dependent early exit breaks the graph each Newton iteration; dynamo
    # logs a warning per break, which says nothing a benchmark reader needs.
    torch._logging.set_logs(dynamo=logging.ERROR)
    return (torch.compile(reference.entropy_normalize_forward), torch.compile(reference.entropy_normalize_backward))


def _reference_compiled(inputs: dict) -> Thunk:
    if inputs["quick"]:
        raise Skipped("left out under --quick: compiling the reference takes tens of seconds per shape")
    forward, backward = _compiled_reference()
    x, target, mode = inputs["x"].detach(), inputs["target"], inputs["mode"]
    tol = reference.default_tol(reference.compute_dtype(x.dtype))

    def call():
        # The reference's own backward, not autograd through its iterations: the same algorithm
        # kexue runs, and no autograd graph for the compiler to trace.
        with torch.no_grad():
            y, gamma, stats = forward(x, target, False, MAX_ITER, tol)
            if mode == "forward":
                return y
            return backward(inputs["grad_y"], torch.zeros_like(gamma), x, gamma, stats, False)

    return call


def _peers(device: torch.device) -> list[Peer]:
    if device.type == "cuda":
        native = [_kexue_peer("kexue", "triton"), _kexue_peer("kexue-cuda", "cuda")]
    else:
        native = [_kexue_peer("kexue", "cpu")]
    return [
        *native,
        Peer("softmax", _softmax),
        _kexue_peer("reference", "torch"),
        Peer("reference-compiled", _reference_compiled),
    ]


def cases(device: torch.device, quick: bool) -> list[Case]:
    peers = _peers(device)
    out = []
    for i, (rows, n, dtype) in enumerate(QUICK_SHAPES if quick else SHAPES):
        for mode in MODES:
            elem = torch.empty((), dtype=dtype).element_size()
            out.append(
                Case(
                    name=f"{rows}x{n} {_DTYPE_NAMES[dtype]}",
                    mode=mode,
                    bytes=BYTES_PER_ELEMENT_MOVED[mode] * rows * n * elem,
                    setup=functools.partial(_inputs, rows, n, dtype, device, mode, quick),
                    peers=peers,
                    headline=i == 0,
                    params={"rows": rows, "n": n, "dtype": _DTYPE_NAMES[dtype], "max_iter": MAX_ITER},
                )
            )
    return out
