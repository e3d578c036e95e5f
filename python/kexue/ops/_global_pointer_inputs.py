"""GlobalPointer inputs: the users' layout checked and turned into the canonical one the backends
take (q, k ``(B, H, L, d)``, biases ``(B, T, L)``, mask ``(B, L)`` bool), and gold spans checked
and turned into CSR rows."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from kexue.ops._checks import check_floating_tensor

ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROPE_CODES = {None: 0, "interleaved": 1, "half": 2}
ROPE_NAMES = {v: k for k, v in ROPE_CODES.items()}
_ALL_FLOATS = ALL_FLOATS


def check_label_range(index: Tensor, batch: int, types: int, length: int) -> None:
    """ValueError naming the first sparse label ``(b, t, i, j)`` with an index out of range."""
    if index.numel() == 0:
        return
    b, t, i, j = index.unbind(-1)
    for name, v, hi in (("batch", b, batch), ("type", t, types), ("start", i, length), ("end", j, length)):
        bad = (v < 0) | (v >= hi)
        if bool(bad.any()):
            row = index[bad.nonzero()[0, 0]].tolist()
            raise ValueError(f"label {row}: {name} index out of range [0, {hi})")


def labels_to_csr(labels: Tensor, batch: int, types: int, length: int) -> tuple[Tensor, Tensor]:
    """``(row_ptr (B*T*L + 1,), cols (N,))`` of the distinct positive spans, sorted.

    ``labels`` is dense ``(B, T, L, L)`` bool or sparse ``(N, 4)`` int64 ``(b, t, i, j)`` rows
    (duplicates count once, as in the dense form).
    """
    index = labels.nonzero() if labels.dim() == 4 else labels
    if labels.dim() != 4:
        # Also under torch.compile and through the raw ops, where the eager checks are skipped:
        # an index out of range would otherwise wrap into another span's key.
        check_label_range(index, batch, types, length)
    rows_total = batch * types * length
    if index.numel() == 0:
        return torch.zeros(rows_total + 1, dtype=torch.int64, device=labels.device), index.new_zeros((0,))
    b, t, i, j = index.to(torch.int64).unbind(-1)
    key = torch.unique(((b * types + t) * length + i) * length + j)  # sorted
    rows, cols = key // length, key % length
    row_ptr = torch.zeros(rows_total + 1, dtype=torch.int64, device=labels.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=rows_total), 0)
    return row_ptr, cols.contiguous()


def rope_code(rope) -> int:
    if rope is True:
        return ROPE_CODES["interleaved"]
    if rope is False or rope is None:
        return 0
    if isinstance(rope, str) and rope in ("interleaved", "half"):
        return ROPE_CODES[rope]
    raise ValueError(f"rope must be True, False, 'interleaved' or 'half', got {rope!r}")


def canonical(q, k, start_bias, end_bias, mask, rope, rope_base):
    """Validate and return ``(q, k, start_bias, end_bias, mask, rope_code, rope_base)`` in the
    canonical layout: q, k ``(B, H, L, d)``; biases ``(B, T, L)``; mask ``(B, L)`` bool."""
    check_floating_tensor("q", q, _ALL_FLOATS)
    check_floating_tensor("k", k, _ALL_FLOATS)
    if q.dim() not in (3, 4):
        raise ValueError(
            f"q must be (B, L, d) (shared by every type) or (B, L, T, d) (one per type), got shape {tuple(q.shape)}"
        )
    if k.shape != q.shape or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(
            f"k must match q in shape, dtype and device: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}"
        )
    batch, length, d = q.shape[0], q.shape[1], q.shape[-1]
    heads = 1 if q.dim() == 3 else q.shape[2]
    code = rope_code(rope)
    if code and d % 2:
        raise ValueError(f"rope needs an even head size, got q's last dim {d}")
    if not isinstance(rope_base, numbers.Real) or isinstance(rope_base, bool) or not rope_base > 0:
        raise ValueError(f"rope_base must be a positive number, got {rope_base!r}")

    biases = []
    types = None
    for name, bias in (("start_bias", start_bias), ("end_bias", end_bias)):
        if bias is None:
            biases.append(None)
            continue
        check_floating_tensor(name, bias, _ALL_FLOATS)
        if bias.dim() != 3 or bias.shape[0] != batch or bias.shape[1] != length:
            raise ValueError(f"{name} must be (B, L, T) = ({batch}, {length}, T), got {tuple(bias.shape)}")
        if types is not None and bias.shape[2] != types:
            raise ValueError(
                f"start_bias and end_bias must have the same number of types, got {types} and {bias.shape[2]}"
            )
        types = bias.shape[2]
        biases.append(bias.to(q.dtype).transpose(1, 2).contiguous())
    if types is None:
        types = heads
    if heads != 1 and heads != types:
        raise ValueError(f"q has {heads} heads but the biases have {types} types; expected 1 head or one per type")
    biases = [b if b is not None else q.new_zeros((batch, types, length)) for b in biases]

    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != (batch, length):
            raise ValueError(f"mask must be (B, L) = ({batch}, {length}), got {tuple(mask.shape)}")
        mask = (mask != 0).contiguous()
    q4 = q.unsqueeze(1) if q.dim() == 3 else q.transpose(1, 2)
    k4 = k.unsqueeze(1) if k.dim() == 3 else k.transpose(1, 2)
    return q4.contiguous(), k4.contiguous(), biases[0], biases[1], mask, code, float(rope_base)


def check_labels(labels, batch: int, types: int, length: int, mask: Tensor, tril_mask: bool) -> Tensor:
    """Dense ``(B, T, L, L)`` or sparse ``(N, 4)`` labels, validated (eagerly) against the spans."""
    if isinstance(labels, Sequence) and not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels, dtype=torch.int64, device=mask.device).reshape(-1, 4)
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"labels must be a tensor (dense (B, T, L, L) bool or sparse (N, 4) int), got {type(labels).__name__}"
        )
    if labels.dim() == 4:
        if labels.shape != (batch, types, length, length):
            raise ValueError(
                f"dense labels must be (B, T, L, L) = {(batch, types, length, length)}, got {tuple(labels.shape)}"
            )
        if labels.dtype != torch.bool:
            if labels.is_floating_point() or labels.is_complex():
                raise TypeError(f"dense labels must be bool (or integer 0/1), got {labels.dtype}")
            labels = labels != 0
        # Passed on dense: the kernels read the rows and report a positive on a masked span as
        # an infinite loss, which global_pointer_loss turns into an error.
        return labels.contiguous()
    elif labels.dim() == 2 and labels.shape[1] == 4:
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"sparse labels must be integer (b, t, start, end) rows, got {labels.dtype}")
        index = labels.to(torch.int64)
        if torch.compiler.is_compiling():
            return index.contiguous()
    else:
        raise ValueError(
            f"labels must be dense (B, T, L, L) = {(batch, types, length, length)} or sparse (N, 4) "
            f"(batch, type, start, end) rows, got shape {tuple(labels.shape)}"
        )
    if labels.device != mask.device:
        raise ValueError(f"labels are on {labels.device} but q is on {mask.device}")
    if index.numel():
        check_label_range(index, batch, types, length)
        b, t, i, j = index.unbind(-1)
        if tril_mask:
            bad = i > j
            if bool(bad.any()):
                row = index[bad.nonzero()[0, 0]].tolist()
                raise ValueError(f"label {row}: start > end, but tril_mask excludes such spans")
        bad = ~(mask[b, i] & mask[b, j])
        if bool(bad.any()):
            row = index[bad.nonzero()[0, 0]].tolist()
            raise ValueError(f"label {row}: the span touches a padded position (mask is False there)")
    return index.contiguous()
