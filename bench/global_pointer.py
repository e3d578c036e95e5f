"""GlobalPointer: the fused loss ``kexue.ops.global_pointer_loss`` against the materializing reference.

Inputs (Efficient GlobalPointer): q, k ``(B, L, d)``, start/end biases ``(B, L, T)``, a padding mask
with ragged lengths, and dense ``(B, T, L, L)`` bool labels with ~4 gold spans per (sample, type).
Every peer receives the same dense labels (the caller's tensor, not counted as working memory).

Peers, in the same process:
- ``kexue``: the C++ CPU kernels (or Triton on CUDA), forced, so that a missing build shows as
  unavailable: the loss is computed block by block with online log-sum-exp; the ``(B, T, L, L)``
  scores never exist.
- ``reference``: what the open-source code does: einsum scores, masks, then the dense multilabel
  cross-entropy over ``(B*T, L*L)`` rows, with autograd (``kexue.reference.global_pointer`` in the
  input dtype).
- ``reference-compiled``: ``torch.compile`` of the same function (left out under --quick).

Modes: ``forward`` (the loss) and ``full`` (loss and its gradients wrt q, k and both biases).

Bytes an op must move: reading q, k and the biases and the labels (``B*T*L*L`` bytes), and
writing the gradients in ``full``; the reference moves several ``4*B*T*L*L``-byte tensors instead.

Peak memory on CPU is not visible to the harness (bench/_memory.py measures CUDA only), so this
module also measures it itself, in a fresh subprocess per (peer, shape): the growth of the
process's peak resident set over one call, with glibc's mmap threshold pinned low so that freed
buffers really leave the process. ``python -m bench.global_pointer --memory`` prints the headline
shape's peaks and the curve over L = 128 .. 2048, and draws the curve; ``--headline`` times the
issue's case directly (single thread by default).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kexue
from bench._case import Case, Headline, Peer, Skipped, Thunk, Unavailable
from bench._memory import mib as _mib
from bench._memory import peak_bytes_cpu as _peak_bytes_cpu
from bench._memory import rss_growth
from kexue.reference import global_pointer as reference

MODES = ("forward", "full")
# (B, L, T, d, dtype); the first is the target case and the headline case.
SHAPES = [(8, 512, 16, 64, torch.float32), (8, 256, 16, 64, torch.bfloat16), (4, 1024, 8, 64, torch.float32)]
QUICK_SHAPES = [(2, 128, 4, 32, torch.float32), (2, 100, 3, 16, torch.bfloat16)]
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
CURVE_LENGTHS = (128, 256, 512, 1024, 2048)
CURVE_BATCH, CURVE_TYPES, CURVE_HEAD = 2, 16, 64

HEADLINES = [
    Headline("full", "reference", "kexue", ">=", 2.0),
    Headline("forward", "reference", "kexue", ">=", 2.0),
    # what a user of torch.compile has today: the compiled einsum + dense loss
    Headline("full", "reference-compiled", "kexue", ">=", 5.0),
]


# --------------------------------------------------------------------------------------------
# Inputs.


def make_inputs(
    batch: int, length: int, types: int, d: int, dtype: torch.dtype, device, mode: str, quick: bool = False
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, d, generator=gen)
    k = torch.randn(batch, length, d, generator=gen)
    sb = torch.randn(batch, length, types, generator=gen)
    eb = torch.randn(batch, length, types, generator=gen)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
    lengths[:1] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    labels = torch.zeros(batch, types, length, length, dtype=torch.bool)
    n = 4 * batch * types
    b = torch.randint(0, batch, (n,), generator=gen)
    t = torch.randint(0, types, (n,), generator=gen)
    start = (torch.rand(n, generator=gen) * (lengths[b] - 4).clamp_min(1)).long()
    end = (start + torch.randint(0, 4, (n,), generator=gen)).clamp_max(lengths[b] - 1)
    labels[b, t, start, end] = True
    tensors = [x.to(device=device, dtype=dtype) for x in (q, k, sb, eb)]
    if mode == "full":
        tensors = [x.requires_grad_() for x in tensors]
    return {"leaves": tensors, "mask": mask.to(device), "labels": labels.to(device), "mode": mode, "quick": quick}


def _in_mode(inputs: dict, loss_fn: Callable) -> Any:
    leaves = inputs["leaves"]
    loss = loss_fn(*leaves, inputs["labels"], inputs["mask"])
    if inputs["mode"] == "forward":
        return loss
    return torch.autograd.grad(loss, leaves)


# --------------------------------------------------------------------------------------------
# Peers.


def reference_loss(q, k, sb, eb, labels, mask):
    """The materializing way: (B, T, L, L) scores, masked, then dense multilabel CE, mean over (B, T)."""
    q4, k4 = q.unsqueeze(1), k.unsqueeze(1)
    s = reference.global_pointer_scores(q4, k4, sb.transpose(1, 2), eb.transpose(1, 2), mask, "interleaved", True)
    return reference.multilabel_crossentropy(s.flatten(-2), labels.flatten(-2)).mean()


def kexue_loss(q, k, sb, eb, labels, mask):
    return kexue.ops.global_pointer_loss(q, k, sb, eb, labels, mask)


def _native_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend kexue's own kernels run on: on CUDA the Triton loss serves fp16/bf16 and the CUDA
    C++ kernels fp32 (kexue.ops._global_pointer_backends says why)."""
    if device.type != "cuda":
        return "cpu"
    return "triton" if dtype in (torch.float16, torch.bfloat16) else "cuda"


def _kexue(inputs: dict) -> Thunk:
    backend = _native_backend(inputs["leaves"][0].device, inputs["leaves"][0].dtype)
    try:
        with kexue.use_backend(backend):
            q, k, sb, eb = (x.detach()[:1, :2] for x in inputs["leaves"])
            kexue.ops.global_pointer_loss(q, k, sb, eb, torch.zeros(0, 4, dtype=torch.int64, device=q.device))
    except kexue.BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None

    def call():
        with kexue.use_backend(backend):
            return _in_mode(inputs, kexue_loss)

    return call


def _reference(inputs: dict) -> Thunk:
    return lambda: _in_mode(inputs, reference_loss)


@functools.cache
def _compiled_reference() -> Callable:
    torch._logging.set_logs(dynamo=logging.ERROR)
    return torch.compile(reference_loss)


def _reference_compiled(inputs: dict) -> Thunk:
    if inputs["quick"]:
        raise Skipped("left out under --quick: compiling the reference takes tens of seconds per shape")
    fn = _compiled_reference()
    return lambda: _in_mode(inputs, fn)


PEERS = {"kexue": _kexue, "reference": _reference, "reference-compiled": _reference_compiled}


def cases(device: torch.device, quick: bool) -> list[Case]:
    peers = [Peer(name, build) for name, build in PEERS.items()]
    out = []
    for i, (batch, length, types, d, dtype) in enumerate(QUICK_SHAPES if quick else SHAPES):
        elem = torch.empty((), dtype=dtype).element_size()
        for mode in MODES:
            inputs_bytes = (2 * batch * length * d + 2 * batch * length * types) * elem
            moved = inputs_bytes * (2 if mode == "full" else 1) + batch * types * length * length
            out.append(
                Case(
                    name=f"B{batch} L{length} T{types} d{d} {_DTYPE_NAMES[dtype]}",
                    mode=mode,
                    bytes=moved,
                    setup=functools.partial(make_inputs, batch, length, types, d, dtype, device, mode, quick),
                    peers=peers,
                    headline=i == 0,
                    params={
                        "batch": batch,
                        "length": length,
                        "types": types,
                        "head_size": d,
                        "dtype": _DTYPE_NAMES[dtype],
                    },
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# Peak memory on CPU, one subprocess per measurement.


def _peak_in_this_process(peer: str, batch: int, length: int, types: int, d: int, mode: str) -> int:
    inputs = make_inputs(batch, length, types, d, torch.float32, torch.device("cpu"), mode)
    fn = {"kexue": lambda: _kexue(inputs), "reference": lambda: _reference(inputs)}[peer]()
    torch.set_num_threads(1)  # per-thread buffers would scale kexue's figure with the core count
    return rss_growth(fn)


def peak_bytes_cpu(peer: str, batch: int, length: int, types: int, d: int, mode: str = "full") -> int | None:
    """Peak extra bytes of one ``peer`` call, measured in a fresh subprocess; None on failure."""
    return _peak_bytes_cpu("bench.global_pointer", [peer, batch, length, types, d, mode])


def memory_report(lengths=CURVE_LENGTHS, headline=(8, 512, 16, 64), out: Path | None = None) -> list[dict]:
    rows = []
    batch, length, types, d = headline
    k = peak_bytes_cpu("kexue", batch, length, types, d)
    r = peak_bytes_cpu("reference", batch, length, types, d)
    print(
        f"headline B={batch} L={length} T={types} d={d} fp32, loss forward+backward, 1 thread: "
        f"kexue {_mib(k)}, reference {_mib(r)}, reference/kexue {_ratio(r, k)}"
    )
    print(f"memory curve B={CURVE_BATCH} T={CURVE_TYPES} d={CURVE_HEAD} fp32, forward+backward:")
    print(f"{'L':>6} {'kexue':>12} {'reference':>12} {'ratio':>8}")
    for length in lengths:
        k = peak_bytes_cpu("kexue", CURVE_BATCH, length, CURVE_TYPES, CURVE_HEAD)
        r = peak_bytes_cpu("reference", CURVE_BATCH, length, CURVE_TYPES, CURVE_HEAD)
        rows.append({"length": length, "kexue": k, "reference": r})
        print(f"{length:>6} {_mib(k):>12} {_mib(r):>12} {_ratio(r, k):>8}", flush=True)
    if out is not None:
        _plot_curve(rows, out)
    return rows


def _ratio(a: int | None, b: int | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.1f}x"


def _plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for peer in ("kexue", "reference"):
        pts = [(r["length"], r[peer] / 2**20) for r in rows if r[peer]]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", label=peer)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("peak extra memory (MiB)")
    ax.set_title(f"GlobalPointer loss fwd+bwd, B={CURVE_BATCH} T={CURVE_TYPES} d={CURVE_HEAD} fp32 (CPU)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def headline_timing(threads: int = 1, compiled: bool = True, runs: int = 5) -> None:
    """The issue's case (B=8, L=512, T=16, d=64, fp32) timed directly: medians of ``runs``
    alternating calls per peer after two warm-up calls, printed with the ratios. A short way to
    the headline numbers when the full bench (three shapes, torch.compile per shape) is too long."""
    import statistics
    import time

    torch.set_num_threads(threads)
    for mode in ("full", "forward"):
        inputs = make_inputs(8, 512, 16, 64, torch.float32, torch.device("cpu"), mode)
        fns = {"kexue": _kexue(inputs), "reference": _reference(inputs)}
        if compiled:
            fns["reference-compiled"] = _reference_compiled(inputs)
        for fn in fns.values():
            fn(), fn()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in samples.items()}
        ratios = ", ".join(f"{name}/kexue {t / med['kexue']:.2f}x" for name, t in med.items() if name != "kexue")
        times = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in med.items())
        print(f"B=8 L=512 T=16 d=64 fp32 {mode}, {threads} thread(s): {times} | {ratios}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.global_pointer")
    parser.add_argument("--memory", action="store_true", help="peak memory at the headline shape and the curve")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(CURVE_LENGTHS))
    parser.add_argument("--headline", action="store_true", help="time the issue's case directly (1 thread)")
    parser.add_argument("--threads", type=int, default=1, help="threads for --headline")
    parser.add_argument("--no-compile", action="store_true", help="--headline without torch.compile(reference)")
    parser.add_argument("--peak", nargs=6, metavar=("PEER", "B", "L", "T", "D", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak:
        peer, b, length, t, d, mode = args.peak
        print(_peak_in_this_process(peer, int(b), int(length), int(t), int(d), mode))
        return 0
    if args.headline:
        headline_timing(args.threads, not args.no_compile)
        return 0
    if args.memory:
        memory_report(args.lengths, out=Path(__file__).resolve().parent / "results" / "global_pointer_memory.png")
        return 0
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
