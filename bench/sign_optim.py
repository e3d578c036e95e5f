"""Sign optimizers: one ``step()`` of ``kexue.optim.Lion`` / ``Tiger`` against its peers.

Inputs: the issue's CPU target, 100M float32 parameters in 50 tensors of mixed sizes (Dirichlet
shares, so a few large matrices and many small ones), each with a random gradient. Every peer
builds its own optimizer (and state) over the same parameters; steps modify the parameters in
place, which changes nothing that is timed.

Modes are the algorithms: ``lion`` cases compare Lion steps, ``tiger`` cases Tiger steps, and
each mode has its headline case (the first of its mode).

Peers, in the same process:
- ``kexue``: the fused step with the device's native backend forced (C++ on CPU, Triton on CUDA),
  so that a missing build shows as unavailable instead of timing the fallback under kexue's name.
- ``adamw-fused`` / ``adamw-foreach``: ``torch.optim.AdamW(fused=True)`` / ``(foreach=True)``, the
  throughput yardsticks of an optimizer step (AdamW moves 28 bytes per parameter, Lion 20).
- ``lion-pytorch``: lucidrains' Lion (a per-tensor loop of in-place ops); ``pytorch-optimizer``:
  that package's Lion / Tiger (foreach where it can). Unavailable when not installed.
- ``reference``: the same fused step through the torch backend (the table interpreted in PyTorch).
- ``reference-compiled``: ``torch.compile`` of the oracle step (``kexue.reference.sign_optim``),
  the strongest plain-PyTorch peer; ``lion-pytorch-compiled`` / ``pytorch-optimizer-compiled``:
  those packages' ``step`` under ``torch.compile``. Compiled peers are left out under --quick.

Bytes per parameter: the floor of a step is 20 (read param, grad, momentum; write param,
momentum), 16 with bfloat16 momentum, and every case is counted at its floor, so the table's
"floor" column is the fraction of the memory floor the step reaches. What a step actually moves
(``bytes_moved_per_param`` in the rows) is more for Tiger's NaN guard: one more read of the
grads, since whether a tensor holds a NaN or inf must be known before any of it is updated (24).
Tiger's RMS(theta) costs nothing more: it is carried from the step that wrote theta
(kexue/optim/_carried_rms.py), where it used to take one more read of the params.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

import kexue
from bench._case import Case, Headline, Peer, Skipped, Thunk, Unavailable
from kexue.optim import Lion, Tiger
from kexue.reference import sign_optim as reference

TENSORS = 50
PARAMS = 100_000_000
QUICK_PARAMS = 2_000_000
LR = 1e-4

# (mode, name, kexue options, floor bytes per parameter, bytes moved per parameter); the first case
# of each mode is its headline.
CASES = [
    ("lion", "100M fp32", {}, 20, 20),
    ("lion", "100M fp32, bf16 momentum", {"momentum_dtype": torch.bfloat16}, 16, 16),
    ("tiger", "100M fp32", {}, 20, 24),
    ("tiger", "100M fp32, no NaN guard", {"nan_guard": None}, 20, 20),
]

HEADLINES = [
    Headline("lion", "kexue", "adamw-fused", "<=", 1 / 1.3),
    Headline("lion", "lion-pytorch", "kexue", ">=", 5.0),
    Headline("lion", "pytorch-optimizer", "kexue", ">=", 5.0),
    Headline("tiger", "pytorch-optimizer", "kexue", ">=", 4.0),
]


def _sizes(total: int, count: int) -> list[int]:
    """``count`` log-normal sizes (a few large tensors, many small ones) adding up to ``total``."""
    gen = torch.Generator().manual_seed(0)
    shares = torch.exp(1.5 * torch.randn(count, generator=gen, dtype=torch.float64))
    sizes = (shares / shares.sum() * total).long().clamp(min=1)
    sizes[int(sizes.argmax())] += total - int(sizes.sum())
    return sizes.tolist()


def _inputs(
    total: int, device: torch.device, quick: bool, dtype: torch.dtype = torch.float32, tensors: int = TENSORS
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    params = []
    for n in _sizes(total, tensors):
        p = (torch.randn(n, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(n, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return {"params": params, "quick": quick}


def _kexue(cls: type, options: dict, backend: str) -> Callable[[dict], Thunk]:
    if cls is Tiger:
        # The bench's tensors are flat: without this Tiger would treat them as biases (no RMS).
        options = {"kind": "matrix", **options}

    def build(inputs: dict) -> Thunk:
        params = inputs["params"]
        opt = cls(params, lr=LR, **options)
        try:
            with kexue.use_backend(backend):
                opt.step()  # also creates the state, outside the timings
        except kexue.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None

        def call():
            with kexue.use_backend(backend):
                opt.step()

        return call

    return build


def _adamw(kind: str) -> Callable[[dict], Thunk]:
    def build(inputs: dict) -> Thunk:
        try:
            opt = torch.optim.AdamW(inputs["params"], lr=LR, **{kind: True})
            opt.step()
        except (RuntimeError, ValueError) as exc:
            raise Unavailable(f"AdamW({kind}=True): {exc}") from None
        return opt.step

    return build


def _lion_pytorch(inputs: dict) -> Thunk:
    try:
        import lion_pytorch
    except ImportError:
        raise Unavailable("lion-pytorch is not installed (pip install lion-pytorch)") from None
    try:
        opt = lion_pytorch.Lion(inputs["params"], lr=LR)
        opt.step()
    except (RuntimeError, ValueError, TypeError) as exc:
        raise Unavailable(f"lion-pytorch: {exc}") from None
    return opt.step


def _pytorch_optimizer(name: str) -> Callable[[dict], Thunk]:
    def build(inputs: dict) -> Thunk:
        try:
            import pytorch_optimizer
        except ImportError:
            raise Unavailable("pytorch-optimizer is not installed (pip install pytorch-optimizer)") from None
        try:
            opt = getattr(pytorch_optimizer, name)(inputs["params"], lr=LR)
            opt.step()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Unavailable(f"pytorch-optimizer {name}: {exc}") from None
        return opt.step

    return build


def _compiled(name: str, make: Callable[[list], torch.optim.Optimizer]) -> Callable[[dict], Thunk]:
    """A peer optimizer's ``step`` under ``torch.compile`` (as torch's docs suggest for optimizers)."""

    def build(inputs: dict) -> Thunk:
        if inputs["quick"]:
            raise Skipped("left out under --quick: compiling a step over 50 shapes takes minutes")
        torch._logging.set_logs(dynamo=logging.ERROR)
        try:
            opt = make(inputs["params"])
        except ImportError:
            raise Unavailable(f"{name} is not installed") from None
        step = torch.compile(opt.step)
        try:
            step()
        except Exception as exc:  # a peer that does not compile is reported, not fatal
            raise Unavailable(f"{name} under torch.compile: {type(exc).__name__}: {exc}") from None
        return step

    return build


def _make_lion_pytorch(params):
    import lion_pytorch

    return lion_pytorch.Lion(params, lr=LR)


def _make_pytorch_optimizer(name: str):
    def make(params):
        import pytorch_optimizer

        return getattr(pytorch_optimizer, name)(params, lr=LR)

    return make


def _reference_compiled(mode: str) -> Callable[[dict], Thunk]:
    def build(inputs: dict) -> Thunk:
        if inputs["quick"]:
            raise Skipped("left out under --quick: compiling the oracle over 50 shapes takes minutes")
        # Tiger's per-tensor NaN check is data-dependent: dynamo breaks the graph there and logs a
        # warning per break, which says nothing a benchmark reader needs.
        torch._logging.set_logs(dynamo=logging.ERROR)
        params = [p.detach() for p in inputs["params"]]
        grads = [p.grad for p in inputs["params"]]
        moms = [torch.zeros_like(p) for p in params]
        if mode == "lion":
            step = torch.compile(functools.partial(reference.lion_step, lr=LR))
        else:
            step = torch.compile(functools.partial(reference.tiger_step, lr=LR))

        def call():
            with torch.no_grad():
                step(params, grads, moms)

        return call

    return build


def _peers(mode: str, options: dict, device: torch.device) -> list[Peer]:
    cls = Lion if mode == "lion" else Tiger
    native = "triton" if device.type == "cuda" else "cpu"
    peers = [
        Peer("kexue", _kexue(cls, options, native)),
        Peer("adamw-fused", _adamw("fused")),
        Peer("adamw-foreach", _adamw("foreach")),
    ]
    if mode == "lion":
        peers += [
            Peer("lion-pytorch", _lion_pytorch),
            Peer("pytorch-optimizer", _pytorch_optimizer("Lion")),
            Peer("lion-pytorch-compiled", _compiled("lion-pytorch", _make_lion_pytorch)),
            Peer("pytorch-optimizer-compiled", _compiled("pytorch-optimizer", _make_pytorch_optimizer("Lion"))),
        ]
    else:
        peers += [
            Peer("pytorch-optimizer", _pytorch_optimizer("Tiger")),
            Peer("pytorch-optimizer-compiled", _compiled("pytorch-optimizer", _make_pytorch_optimizer("Tiger"))),
        ]
    peers += [Peer("reference", _kexue(cls, options, "torch")), Peer("reference-compiled", _reference_compiled(mode))]
    return peers


def cases(device: torch.device, quick: bool) -> list[Case]:
    total = QUICK_PARAMS if quick else PARAMS
    label = f"{total // 1_000_000}M"
    setup = functools.partial(_inputs, total, device, quick)
    out, seen_modes = [], set()
    for mode, name, options, per_param, moved in CASES:
        if quick and options:
            continue  # one case per mode is enough for a smoke run
        out.append(
            Case(
                name=name.replace("100M", label) + f" in {TENSORS} tensors",
                mode=mode,
                bytes=per_param * total,
                setup=setup,
                peers=_peers(mode, options, device),
                headline=mode not in seen_modes,
                params={
                    "params": total,
                    "tensors": TENSORS,
                    "dtype": "fp32",
                    "bytes_per_param": per_param,
                    "bytes_moved_per_param": moved,
                    **{k: str(v) for k, v in options.items()},
                },
            )
        )
        seen_modes.add(mode)
    return out


if __name__ == "__main__":
    import sys

    from bench._sign_optim_profile import main

    sys.exit(main())
