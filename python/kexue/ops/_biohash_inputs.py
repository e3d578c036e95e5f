"""Validation of BioHash inputs: argument types and shapes, CSR batches, and the value checks
(ids in range, well-formed offsets, finite learning-step scalars) that keep every kernel in bounds.

Two layers call in here. The public functions (kexue.ops.biohash) check types and shapes and turn
the padded spelling into CSR. The custom ops (kexue.ops._biohash_ops) check the values that decide
where a kernel reads and writes, right before the launch: that is the one place every call passes
through, eagerly, under torch.compile (the op's body runs outside the traced graph) and through the
raw ``torch.ops.kexue.*`` ops, so a bad id is a ValueError there too, never an out-of-bounds access.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

SYNAPSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must lie in {bound}, got {value}")
    return value


def check_synapses(synapses, allowed=SYNAPSE_DTYPES) -> Tensor:
    """Validate ``synapses (K, N)`` and return the ``(N, K)`` contiguous view (or copy) the kernels read."""
    if not isinstance(synapses, Tensor):
        raise TypeError(f"synapses must be a torch.Tensor, got {type(synapses).__name__}")
    if synapses.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"synapses must have dtype {names}; got {synapses.dtype}")
    if synapses.dim() != 2 or synapses.shape[0] < 1 or synapses.shape[1] < 1:
        raise ValueError(f"synapses must be a (K, N) matrix with K, N >= 1, got shape {tuple(synapses.shape)}")
    return synapses.t().contiguous()  # a no-op for input-major storage


def check_row_shapes(indices: Tensor, offsets: Tensor, weights: Tensor | None) -> None:
    """The shapes of a CSR batch: int64 ``indices (nnz,)`` and ``offsets (B+1,)``, ``weights`` None
    or ``(nnz,)``. Reads no data."""
    if indices.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise TypeError(f"indices and offsets must be int64, got {indices.dtype} and {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1 or indices.dim() != 1:
        raise ValueError(
            f"a CSR batch is indices (nnz,) and offsets (B+1,), got shapes {tuple(indices.shape)} "
            f"and {tuple(offsets.shape)}"
        )
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"weights must be None or (nnz,) = {tuple(indices.shape)}, got {tuple(weights.shape)}")


def check_rows(indices: Tensor, offsets: Tensor, weights: Tensor | None, num_inputs: int) -> None:
    """Everything a kernel over a CSR batch relies on: the shapes (:func:`check_row_shapes`);
    offsets start at 0, never decrease, end at nnz, and leave no row empty; every id lies in
    ``[0, num_inputs)``. Reads the data (a device sync on a GPU)."""
    check_row_shapes(indices, offsets, weights)
    # One reduction over the row lengths and one over the ids: on a 10,000-window batch separate
    # passes for each condition cost 7% of a single-threaded hashing call.
    lengths = offsets[1:] - offsets[:-1]
    shortest = int(lengths.min()) if lengths.numel() else 1
    if int(offsets[0]) != 0 or int(offsets[-1]) != indices.shape[0] or shortest < 0:
        raise ValueError(
            f"offsets must start at 0, never decrease and end at nnz = {indices.shape[0]}; "
            f"got {offsets.tolist() if offsets.numel() <= 12 else 'a longer tensor'}"
        )
    if shortest == 0:
        row = int(torch.nonzero(lengths == 0)[0, 0])
        raise ValueError(f"row {row} of the batch has no tokens (an empty window); every row needs at least one")
    if indices.numel() > 0:
        low, high = (int(x) for x in torch.aminmax(indices))
        if low < 0 or high >= num_inputs:
            bad = low if low < 0 else high
            raise ValueError(
                f"indices must lie in [0, N) = [0, {num_inputs}) for synapses of N = {num_inputs} inputs; found {bad}"
            )


def check_update_scalars(lr, delta, rank, prec, tiny, num_hidden: int) -> None:
    """The learning step's scalars: a non-finite lr or delta would write inf/NaN synapses."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (0 <= lr < math.inf):
        raise ValueError(f"lr must be a finite non-negative float, got {lr!r}")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a float, got {type(delta).__name__}")
    if not math.isfinite(delta):
        raise ValueError(f"delta must be a finite float, got {delta!r}")
    check_int("rank", rank, 1, num_hidden)
    if isinstance(prec, bool) or not (isinstance(prec, numbers.Real) and 0 < prec < math.inf):
        raise ValueError(f"prec must be a finite positive float, got {prec!r}")
    if isinstance(tiny, bool) or not (isinstance(tiny, numbers.Real) and 0 <= tiny < math.inf):
        raise ValueError(f"tiny must be a finite non-negative float, got {tiny!r}")


def _check_weights(weights, indices: Tensor, device: torch.device) -> None:
    if weights is None:
        return
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}, got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but synapses are on {device}")


def _padded(indices: Tensor, mask, weights) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(B, L)`` ids with a bool mask (None: all valid) -> CSR. Masked positions are dropped, so
    whatever they hold (an out-of-range id, a NaN weight) never reaches a kernel."""
    rows, width = indices.shape
    if mask is None:
        lengths = torch.full((rows,), width, dtype=torch.int64, device=indices.device)
        flat_ids = indices.reshape(-1)
        flat_w = None if weights is None else weights.reshape(-1)
    else:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                "with 2-D indices, offsets_or_mask must be a bool mask (B, L) or None, got "
                f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        if mask.shape != indices.shape:
            raise ValueError(f"mask must have the shape of indices {tuple(indices.shape)}, got {tuple(mask.shape)}")
        if mask.device != indices.device:
            raise ValueError(f"mask is on {mask.device} but indices are on {indices.device}")
        lengths = mask.sum(1)
        flat_ids = indices[mask]
        flat_w = None if weights is None else weights[mask]
    offsets = torch.zeros(rows + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return flat_ids, offsets, flat_w


def csr(
    indices, offsets_or_mask, weights, device: torch.device, weight_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check a sparse batch's types and shapes and return it as CSR: ``indices (nnz,)`` int64,
    ``offsets (B+1,)`` int64, ``weights (nnz,)`` in ``weight_dtype`` or None, all contiguous.
    The values (ids in range, offsets) are checked by :func:`check_rows`, in the custom op.

    Two spellings are accepted:
    - CSR: ``indices (nnz,)`` and ``offsets (B+1,)`` with ``offsets[0] = 0``, non-decreasing,
      ``offsets[-1] = nnz``; ``weights (nnz,)``.
    - padded: ``indices (B, L)`` and a bool ``mask (B, L)`` of valid positions (None: all valid);
      ``weights (B, L)``.
    """
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must have dtype int64 or int32; got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but synapses are on {device}")
    _check_weights(weights, indices, device)
    if indices.dim() == 2:
        flat_ids, offsets, flat_w = _padded(indices, offsets_or_mask, weights)
    elif indices.dim() == 1:
        offsets = offsets_or_mask
        if not isinstance(offsets, Tensor):
            raise TypeError(
                f"with 1-D indices, offsets_or_mask must be the CSR offsets, a (B+1,) int64 tensor, "
                f"got {type(offsets).__name__}"
            )
        if offsets.dtype not in (torch.int64, torch.int32) or offsets.dim() != 1 or offsets.shape[0] < 1:
            raise ValueError(
                f"offsets must be a (B+1,) int64 tensor, got {offsets.dtype} of shape {tuple(offsets.shape)}"
            )
        if offsets.device != device:
            raise ValueError(f"offsets is on {offsets.device} but synapses are on {device}")
        flat_ids, flat_w = indices, weights
    else:
        raise ValueError(
            f"indices must be (nnz,) with CSR offsets or (B, L) with a mask, got shape {tuple(indices.shape)}"
        )
    flat_ids = flat_ids.to(torch.int64).contiguous()
    if flat_w is not None:
        flat_w = flat_w.to(weight_dtype).contiguous()
    return flat_ids, offsets.to(torch.int64).contiguous(), flat_w
