"""Entropy normalization: ``kexue.ops.entropy_normalize`` and its custom ops.

``kexue::entropy_normalize`` and ``kexue::entropy_normalize_backward`` are ``torch.library``
custom ops over flattened rows; each dispatches to the backend that :mod:`kexue._backend` picks.
The math is in csrc/include/kexue/entropy_norm.h and kexue.reference.entropy_norm.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._checks import check_floating_tensor, normalize_dim
from kexue.reference import entropy_norm as reference

OP = "entropy_normalize"  # the registry name, as the custom op kexue::entropy_normalize
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Backends. Each takes rows (R, n) contiguous and targets (R,) in the compute dtype.


def _triton_module():
    from kexue.triton_kernels import entropy_norm

    return entropy_norm


def _register_backends() -> None:
    _backend.register(
        OP,
        "torch",
        (reference.entropy_normalize_forward, reference.entropy_normalize_backward),
        _FLOATS + (torch.float64,),
    )
    native = _backend.native()
    if native is not None:
        _backend.register(
            OP,
            "cpu",
            (native.entropy_normalize_forward_cpu, native.entropy_normalize_backward_cpu),
            _FLOATS + (torch.float64,),
        )
        if getattr(native, "WITH_CUDA", False):
            _backend.register(
                OP, "cuda", (native.entropy_normalize_forward_cuda, native.entropy_normalize_backward_cuda), _FLOATS
            )
    _backend.register(
        OP, "triton", (lambda *a: _triton_module().forward(*a), lambda *a: _triton_module().backward(*a)), _FLOATS
    )


_register_backends()


# --------------------------------------------------------------------------------------------
# Checks inside the op bodies. The public function shapes the user's input into rows; the custom
# ops are also reached raw (torch.ops.kexue.*) and from compiled graphs, where a short target or
# gradient would otherwise be read past its end by a kernel. Metadata only: no synchronisation.


def _check_rows_layout(name: str, t, shape, dtype: torch.dtype, like: Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != like.device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {like.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the custom ops take rows in the canonical layout)")


def _check_raw_rows(x: Tensor) -> tuple[int, torch.dtype]:
    """``(R, compute dtype)`` of contiguous rows ``x (R, n)``."""
    check_floating_tensor("x", x, allowed=_FLOATS + (torch.float64,))
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be (rows, n) with n >= 1, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (the custom ops take rows in the canonical layout)")
    return x.shape[0], reference.compute_dtype(x.dtype)


def _check_raw_forward(x: Tensor, target: Tensor, max_iter: int, tol: float) -> None:
    rows, ct = _check_raw_rows(x)
    _check_rows_layout("target", target, (rows,), ct, x)
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive float, got {tol}")


def _check_raw_backward(grad_y: Tensor, grad_gamma: Tensor, x: Tensor, gamma: Tensor, stats: Tensor) -> None:
    rows, ct = _check_raw_rows(x)
    _check_rows_layout("grad_y", grad_y, x.shape, x.dtype, x)
    _check_rows_layout("grad_gamma", grad_gamma, (rows,), ct, x)
    _check_rows_layout("gamma", gamma, (rows,), ct, x)
    _check_rows_layout("stats", stats, (rows, 2), ct, x)


# --------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("kexue::entropy_normalize", mutates_args=())
def entropy_normalize_op(
    x: Tensor, target: Tensor, logits: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``x (R, n)``, targets ``(R,)`` -> ``(y (R, n), gamma (R,), stats (R, 2))``."""
    _check_raw_forward(x, target, max_iter, tol)
    _, (forward, _) = _backend.select(OP, x)
    y, gamma, stats = forward(x, target, logits, max_iter, tol)
    if not logits:
        _refuse_negative_probabilities(x, gamma)
    return y, gamma, stats


def _refuse_negative_probabilities(x: Tensor, gamma: Tensor) -> None:
    """Raise the ValueError for a negative probability, from the op body.

    The check lives here, not in the public function, so that it also holds under torch.compile
    (the body runs on real tensors inside the compiled graph) and for the raw op. Every backend
    turns a negative entry into log p = NaN and the row into a NaN row, so gamma is the error flag:
    one read of R values after the call, and x is searched only when some row came out NaN (which
    a NaN or +inf entry, an all-zero row or a NaN target also give, legitimately).
    """
    if gamma.numel() == 0 or not bool(torch.isnan(gamma).any()):
        return
    negative = x < 0
    if bool(negative.any()):
        # x ** gamma of a negative entry is NaN: say so instead of returning a NaN row
        raise ValueError(
            f"x holds probabilities, which must be non-negative; found {x[negative].flatten()[0].item()} "
            "(pass logits=True for logits)"
        )


@entropy_normalize_op.register_fake
def _(x, target, logits, max_iter, tol):
    ct = reference.compute_dtype(x.dtype)
    rows = x.shape[0]
    return torch.empty_like(x), x.new_empty((rows,), dtype=ct), x.new_empty((rows, 2), dtype=ct)


@torch.library.custom_op("kexue::entropy_normalize_backward", mutates_args=())
def entropy_normalize_backward_op(
    grad_y: Tensor, grad_gamma: Tensor, x: Tensor, gamma: Tensor, stats: Tensor, logits: bool
) -> tuple[Tensor, Tensor]:
    """Gradients ``(grad_x (R, n), grad_target (R,))``."""
    _check_raw_backward(grad_y, grad_gamma, x, gamma, stats)
    _, (_, backward) = _backend.select(OP, x)
    return backward(grad_y, grad_gamma, x, gamma, stats, logits)


@entropy_normalize_backward_op.register_fake
def _(grad_y, grad_gamma, x, gamma, stats, logits):
    return torch.empty_like(x), torch.empty_like(gamma)


def _setup_context(ctx, inputs, output):
    x, _target, logits, _max_iter, _tol = inputs
    _y, gamma, stats = output
    ctx.save_for_backward(x, gamma, stats)
    ctx.logits = logits


def _backward(ctx, grad_y, grad_gamma, _grad_stats):
    x, gamma, stats = ctx.saved_tensors
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    grad_gamma = torch.zeros_like(gamma) if grad_gamma is None else grad_gamma.contiguous()
    grad_x, grad_target = entropy_normalize_backward_op(grad_y, grad_gamma, x, gamma, stats, ctx.logits)
    return grad_x, grad_target, None, None, None


entropy_normalize_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function.


def _target_rows(target, batch_shape: torch.Size, n: int, like: Tensor) -> Tensor:
    """Validate ``target`` and return it as contiguous ``(R,)`` in the compute dtype."""
    ct = reference.compute_dtype(like.dtype)
    high = math.log(n)
    # A little slack above log n so that log(n) computed in float32 is accepted; such targets
    # are answered exactly with the uniform distribution.
    slack = 1e-6 * max(1.0, high)
    if isinstance(target, bool) or not isinstance(target, (numbers.Real, Tensor)):
        raise TypeError(f"target must be a float or a tensor, got {type(target).__name__}")
    if isinstance(target, numbers.Real):
        t = float(target)
        if not (0.0 <= t <= high + slack):
            raise ValueError(f"target must lie in [0, log n] = [0, {high:.6g}] for rows of n={n}, got {t}")
        return torch.full((math.prod(batch_shape),), t, dtype=ct, device=like.device)
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got dtype {target.dtype}")
    if target.device != like.device:
        raise ValueError(f"target is on {target.device} but x is on {like.device}")
    try:
        expanded = torch.broadcast_to(target, batch_shape)
    except RuntimeError:
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not broadcast to the batch shape {tuple(batch_shape)} "
            "(x's shape without dim)"
        ) from None
    if not torch.compiler.is_compiling() and target.numel() > 0:
        bad = ~((target >= 0) & (target <= high + slack))
        if bool(bad.any()):
            raise ValueError(
                f"every target must lie in [0, log n] = [0, {high:.6g}] for rows of n={n}; "
                f"found {target[bad].flatten()[0].item()}"
            )
    return expanded.reshape(-1).to(ct).contiguous()


def entropy_normalize(
    x: Tensor,
    target: float | Tensor,
    *,
    dim: int = -1,
    logits: bool = False,
    max_iter: int = 20,
    tol: float | None = None,
    return_gamma: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Rescale distributions to a given entropy by a power transform (a per-row temperature).

    Each row ``p`` along ``dim`` becomes ``p**gamma / sum(p**gamma)`` (for logits ``z``:
    ``softmax(gamma * z)``), with ``gamma >= 0`` solved per row by safeguarded Newton iterations so
    that the row's entropy (in nats) equals ``target``. Order is preserved; ``gamma < 1`` flattens,
    ``gamma > 1`` sharpens. Su Jianlin, "Entropy normalization", kexue.fm/archives/8829.

    Args:
        x: ``(*, n, *)`` probabilities (non-negative; rows need not sum to 1) or, with
            ``logits=True``, logits (``-inf`` masks an entry). float16, bfloat16, float32 or float64.
        target: entropy in nats, in ``[0, log n]``: a float, or a tensor broadcastable to the batch
            shape (``x.shape`` without ``dim``). A differentiable tensor receives gradients.
        dim: the dimension that holds each distribution.
        logits: ``x`` holds logits rather than probabilities.
        max_iter: most Newton iterations per row. Fewer give rougher control, as in the post
            (1-2 iterations). Rows too long for one tile on the triton backend solve for gamma in
            sweeps over the row instead (docs/entropy_norm.md), and max_iter caps the sweeps.
        tol: relative step of gamma below which a row counts as converged (default 1e-5 for
            16/32-bit inputs, 1e-10 for float64).
        return_gamma: also return gamma, shaped like the batch, in float32 (float64 for float64).

    Returns:
        ``y`` shaped and typed like ``x``, and ``gamma`` if ``return_gamma``.

    Rows whose target is unreachable are answered by the limit: ``target >= log(#nonzero)`` gives
    the uniform distribution over the non-zero entries (gamma = 0), ``target <= log(#maxima)``
    gives the uniform distribution over the maxima (gamma = inf). A row holding NaN or +inf, or no
    non-zero entry, gives NaN, as softmax does. Gradients flow to ``x`` and ``target`` by implicit
    differentiation of H(y) = target; rows solved at a limit have zero gradient.
    """
    check_floating_tensor("x", x, allowed=_FLOATS + (torch.float64,))
    dim = normalize_dim("dim", dim, x.dim())
    n = x.shape[dim]
    if n == 0:
        raise ValueError(f"x must have at least one entry along dim={dim}, got shape {tuple(x.shape)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if tol is None:
        tol = reference.default_tol(reference.compute_dtype(x.dtype))
    elif not (isinstance(tol, numbers.Real) and tol > 0):
        raise ValueError(f"tol must be a positive float, got {tol!r}")

    # A negative probability is refused by the custom op itself (_refuse_negative_probabilities),
    # eagerly, under torch.compile and through torch.ops.kexue.entropy_normalize alike.
    moved = x.movedim(dim, -1)
    batch_shape = moved.shape[:-1]
    rows = moved.reshape(-1, n).contiguous()
    targets = _target_rows(target, batch_shape, n, x)
    y, gamma, _stats = entropy_normalize_op(rows, targets, bool(logits), int(max_iter), float(tol))
    y = y.reshape(moved.shape).movedim(-1, dim)
    if return_gamma:
        return y, gamma.reshape(batch_shape)
    return y
