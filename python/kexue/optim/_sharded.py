"""DTensor parameters (FSDP2, tensor parallel): the fused step runs on the local shards.

Everything in a Lion/Tiger step is element-wise or per row, so it runs unchanged on each rank's
shard, except two per-tensor reductions of Tiger: the RMS of the whole tensor (its learning-rate
factor) and the NaN guard's "any NaN or inf in this gradient". For a sharded tensor both are completed
across the ranks that hold its shards here, before the kernel runs, with one all-reduce per
process group for all tensors together; the kernel then gets the finished learning rate (the RMS
flag cleared) and the guard's verdict (the SHRINK_NOW flag), so its own reductions are skipped.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from kexue import _sign_table as table

try:
    from torch.distributed.tensor import DTensor, Shard
except Exception:  # torch built without distributed
    DTensor = Shard = None


def local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (a plain tensor is its own)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def shard_groups(p: Tensor) -> tuple | None:
    """The process groups over which ``p`` is sharded (None: not a sharded DTensor)."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    mesh = p.device_mesh
    dims = [i for i, placement in enumerate(p.placements) if isinstance(placement, Shard)]
    if not dims:
        return None
    return tuple(mesh.get_group(i) for i in dims)


def sharded_last_dim(p: Tensor) -> bool:
    """Whether ``p`` is split along its last dimension (rows would then straddle ranks)."""
    if DTensor is None or not isinstance(p, DTensor):
        return False
    return any(isinstance(pl, Shard) and pl.dim % max(p.dim(), 1) == p.dim() - 1 for pl in p.placements)


def complete_reductions(
    params: list[Tensor], grads: list[Tensor], rows_f: list[list[float]], rows_i: list[list[int]]
) -> None:
    """Finish Tiger's per-tensor reductions of sharded tensors across ranks, editing the table rows.

    ``params``/``grads`` are the DTensors (or plain tensors, left alone); each row's NAN_GROUP is
    already linked (-1, the row itself, or the first row of the shared group).
    """
    by_groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups = shard_groups(p)
        flags = rows_i[i][table.FLAGS]
        wants = (flags & table.RMS_TENSOR and flags & table.UPDATE) or rows_i[i][table.NAN_GROUP] >= 0
        if groups is not None and wants:
            by_groups[groups].append(i)
    if not by_groups:
        return
    nan_of: dict[int, bool] = {}
    for groups, idx in by_groups.items():
        # [sum of squares..., NaN flags...] in float64: one all-reduce (sum) per process group.
        ssq = [local(params[i]).detach().double().pow(2).sum() for i in idx]
        nan = [(~torch.isfinite(local(grads[i]))).any().double() for i in idx]
        values = torch.stack(ssq + nan)
        for group in groups:
            torch.distributed.all_reduce(values, group=group)
        values = values.tolist()
        for k, i in enumerate(idx):
            row_f, row_i = rows_f[i], rows_i[i]
            if row_i[table.FLAGS] & table.RMS_TENSOR and row_i[table.FLAGS] & table.UPDATE:
                numel = params[i].numel()
                row_f[table.LR] *= (values[k] / numel) ** 0.5 if numel else 0.0
                row_i[table.FLAGS] &= ~table.RMS_TENSOR
            nan_of[i] = values[len(idx) + k] > 0
    # The guard's verdict per group: settled here for every group that holds a sharded tensor (its
    # plain members are replicated, so their local check is already global), left to the kernel
    # for the others.
    decided = {rows_i[i][table.NAN_GROUP] for i in nan_of} - {-1}
    verdict: dict[int, bool] = defaultdict(bool)
    for i, row_i in enumerate(rows_i):
        group = row_i[table.NAN_GROUP]
        if group in decided:
            verdict[group] |= nan_of[i] if i in nan_of else not bool(torch.isfinite(local(grads[i])).all())
    for row_i in rows_i:
        group = row_i[table.NAN_GROUP]
        if group in decided:
            row_i[table.NAN_GROUP] = -1
            if verdict[group]:
                row_i[table.FLAGS] |= table.SHRINK_NOW
