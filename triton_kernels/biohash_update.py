"""The FlyVec / BioHash learning step in Triton (contract: biohash_update_ in
python/kexue/reference/biohash.py and biohash_update_cpu in csrc/cpu/biohash_update.cpp)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .biohash import (
    MAX_HIDDEN,
    _gather_sum,
    _interpreting,
    _mul_rn,
    _order_key,
    block_k,
    num_warps_for,
    stages_for,
    tokens_per_step,
)
from .biohash_update_ds import _group_sums_kernel, _update_ds_kernel

# ---------------------------------------------------------------------------------------------
# The learning step (contract: biohash_update_cpu in csrc/cpu/biohash_update.cpp and the reference's
# biohash_update_). Four launches and a sort, all deterministic (no atomics anywhere):
#
# 1. _update_rows_kernel, one program per CSR row: raw and scaled activations (gathered from the
#    row's columns of synapses_t, never a dense input), the winner (largest raw key, lowest
#    index), with ANTI the unit ranked `rank`-th, and each token's Hebbian contributions
#    (unit, value): (winner, w_j) at slot j and, with ANTI, (ranked unit, -delta * w_j) at slot
#    nnz + j.
# 2. _update_xx_kernel, one program per block of units and slice of 256 rows: partial sums of
#    xx[mu]; _update_nx_kernel adds the slices in order and stores nx = -xx on active units
#    (xx != 0) and 0 elsewhere.
# 3. (torch) the contributions stably sorted by (input id, unit): each (input, unit) pair is one
#    run, in the CPU kernel's order (winners in sample order, then ranked units), and
#    _group_sums_kernel adds each run once, one lane per run, from 0.0 in that order (no atomics,
#    no (N, K) scratch). bounds (torch.searchsorted) gives each (synapse row, block of units) its
#    runs, sorted by unit: at most one per unit.
# 4. _update_ds_kernel twice (it and _group_sums_kernel live in biohash_update_ds.py), one
#    program per row i of synapses_t (and block of units):
#    ds[i, mu] = nx[mu] * W[i, mu] + (the run sum of (i, mu), 0 without one) on active units (0 on
#    the others). The run sums reach their lanes without a loop over the bucket: a histogram of
#    the runs' units marks their lanes, and the marked lanes, in order, take the runs in order (an
#    exclusive count of the marks indexes them). Work per program: one pass over the row's block
#    and over its runs (ceil(runs / CHUNK) histogram trips), where the loop it replaced did
#    BLOCK_K-wide work for every contribution in the input's bucket (a frequent word's bucket holds
#    thousands). The first pass writes each program's max |ds| (a partial; torch's amax makes
#    it the global nc); the second applies W += lr / max(nc, prec) * ds where the change exceeds
#    tiny. The decay term touches every row of synapses_t (column mu of W for each active unit
#    mu), so both passes stream the whole matrix: ds is recomputed rather than stored.
#
# Products are rounded on their own (_mul_rn) and the division is div_rn, as on the CPU, so the
# only difference from the CPU kernel is the order in which xx adds up the batch.


@triton.jit
def _row_rank_unit(keys, cols, rank, BLOCK_K: tl.constexpr):
    """Index of the unit ranked ``rank``-th by ``keys`` (ties to the lowest index)."""
    threshold = tl.zeros((1,), tl.uint32)
    for b in tl.static_range(31, -1, -1):
        candidate = threshold | (1 << b)
        count = tl.sum(tl.where(keys[None, :] >= candidate[:, None], 1.0, 0.0), axis=1)
        threshold = tl.where(count >= rank, candidate, threshold)
    thr = tl.max(threshold, axis=0)
    greater = tl.sum(tl.where(keys > thr, 1.0, 0.0), axis=0)
    tied = keys == thr
    tied_upto = tl.cumsum(tl.where(tied, 1.0, 0.0), axis=0)  # inclusive
    # the one lane that matches, summed as float32 (exact: < 2**24; see the hash kernel's counts)
    return tl.sum(tl.where(tied & (tied_upto == rank - greater), cols.to(tl.float32), 0.0), axis=0).to(tl.int32)


@triton.jit
def _update_rows_kernel(
    ids_ptr,
    offsets_ptr,
    weights_ptr,
    wt_ptr,
    winners_ptr,
    s_win_ptr,
    second_ptr,
    s_second_ptr,
    unit_ptr,
    value_ptr,
    K,
    nnz,
    rank,
    delta,
    ANTI: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TOKENS: tl.constexpr,
    STAGES: tl.constexpr,
    EXACT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    cols = tl.arange(0, BLOCK_K)
    in_row = cols < K

    # Scaled (update) and raw (winner) activations in row order, TOKENS rows of wt in flight
    # (the hash kernel's pipelined gather).
    scaled, raw = _gather_sum(
        ids_ptr, weights_ptr, wt_ptr, start, end, K, cols, in_row, TOKENS, STAGES, BLOCK_K, True, EXACT
    )

    # Winner: the largest key, lowest index (padding keys are 0, below every real key).
    keys = tl.where(in_row, _order_key(raw), 0)
    best = tl.max(keys, axis=0)
    winner = tl.min(tl.where(keys == best, cols, BLOCK_K), axis=0)
    s_win = tl.sum(tl.where(cols == winner, scaled, 0.0), axis=0)
    tl.store(winners_ptr + row, winner.to(tl.int64))
    tl.store(s_win_ptr + row, s_win)
    if ANTI:
        second = _row_rank_unit(keys, cols, rank, BLOCK_K)
        tl.store(second_ptr + row, second.to(tl.int64))
        tl.store(s_second_ptr + row, tl.sum(tl.where(cols == second, scaled, 0.0), axis=0))

    # Hebbian contributions of the row's tokens.
    for j in range(start, end):
        w = tl.load(weights_ptr + j)
        tl.store(unit_ptr + j, winner)
        tl.store(value_ptr + j, w)
        if ANTI:
            tl.store(unit_ptr + nnz + j, second)
            tl.store(value_ptr + nnz + j, -delta * w)  # one rounding, as on the CPU


@triton.jit
def _update_xx_kernel(
    winners_ptr,
    s_win_ptr,
    second_ptr,
    s_second_ptr,
    partial_ptr,
    rows,
    K,
    delta,
    rows_per_split,
    ANTI: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_U: tl.constexpr,
    EXACT: tl.constexpr,
):
    """partial[split, mu]: the xx terms of rows [split * rows_per_split, ...) for a block of units."""
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    split = tl.program_id(1)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, rows)
    xx = tl.zeros((BLOCK_U,), tl.float32)
    for b0 in range(first, last, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        ok = bs < last
        win = tl.load(winners_ptr + bs, mask=ok, other=-1).to(tl.int32)
        s = tl.load(s_win_ptr + bs, mask=ok, other=0.0)
        xx += tl.sum(tl.where(win[:, None] == units[None, :], s[:, None], 0.0), axis=0)
    if ANTI:
        for b0 in range(first, last, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            ok = bs < last
            sec = tl.load(second_ptr + bs, mask=ok, other=-1).to(tl.int32)
            s = _mul_rn(
                -delta + tl.zeros((BLOCK_B,), tl.float32), tl.load(s_second_ptr + bs, mask=ok, other=0.0), EXACT
            )
            xx += tl.sum(tl.where(sec[:, None] == units[None, :], s[:, None], 0.0), axis=0)
    tl.store(partial_ptr + split * K + units, xx, mask=units < K)


@triton.jit
def _update_nx_kernel(partial_ptr, nx_ptr, splits, K, BLOCK_U: tl.constexpr):
    """nx = -xx on active units (xx != 0), 0 elsewhere; xx = the partials summed in split order."""
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    ok = units < K
    xx = tl.zeros((BLOCK_U,), tl.float32)
    for split in range(0, splits):
        xx += tl.load(partial_ptr + split * K + units, mask=ok, other=0.0)
    tl.store(nx_ptr + units, tl.where(xx != 0, -xx, 0.0), mask=ok)


UPDATE_BLOCK_B = 64
UPDATE_BLOCK_U = 32
UPDATE_ROWS_PER_SPLIT = 256  # rows of the batch per xx program
MAX_DS_BLOCK = 1024
GROUP_BLOCK = 32  # groups per program of _group_sums_kernel: one warp


def rows_tokens(block: int) -> int:
    """Tokens a gather step of _update_rows_kernel: half the hash kernel's (same float32 warps),
    as it keeps two sums (raw and scaled) and, with ANTI, the rank search live beside the tile
    (with the hash kernel's count ptxas keeps an 8 to 16-byte stack at K <= 2048 on sm_80)."""
    return max(1, tokens_per_step(block, num_warps_for(block)) // 2)


def ds_chunk(block: int) -> int:
    """Groups a trip of the ds kernel marks: one per thread."""
    return 32 * num_warps_for(block)


def ds_block(num_hidden: int) -> int:
    """Lanes per program of the ds passes: the row's units, up to MAX_DS_BLOCK."""
    return min(block_k(num_hidden), MAX_DS_BLOCK)


def biohash_update(
    indices: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    synapses_t: torch.Tensor,
    lr: float,
    delta: float,
    rank: int,
    prec: float,
    tiny: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FlyVec step in place on ``synapses_t (N, K)`` float32 (contract: kexue.ops.biohash_update).

    ``indices (nnz,)`` int64, ``offsets (B+1,)`` int64, ``weights (nnz,)`` float32 or None.
    Returns ``(winners (B,) int64, s_win (B,) float32)``.
    """
    if synapses_t.dtype != torch.float32:
        raise TypeError(f"the Triton biohash update takes float32 synapses, got {synapses_t.dtype}")
    rows = offsets.shape[0] - 1
    num_inputs, num_hidden = synapses_t.shape
    if num_hidden > MAX_HIDDEN:
        raise ValueError(f"the Triton biohash kernel serves K <= {MAX_HIDDEN}, got K = {num_hidden}")
    device = synapses_t.device
    winners = torch.empty(rows, dtype=torch.int64, device=device)
    s_win = torch.empty(rows, dtype=torch.float32, device=device)
    if rows == 0:  # no winner, no active unit: nothing moves
        return winners, s_win
    anti = delta != 0.0
    nnz = indices.shape[0]
    if weights is None:  # a weight of 1 changes no product
        weights = torch.ones(nnz, dtype=torch.float32, device=device)
    weights = weights.float().contiguous()
    second = torch.empty(rows if anti else 1, dtype=torch.int64, device=device)
    s_second = torch.empty(rows if anti else 1, dtype=torch.float32, device=device)
    units = torch.empty((2 if anti else 1) * nnz, dtype=torch.int32, device=device)
    values = torch.empty_like(units, dtype=torch.float32)
    exact = not _interpreting()
    block = block_k(num_hidden)
    _update_rows_kernel[(rows,)](
        indices,
        offsets,
        weights,
        synapses_t,
        winners,
        s_win,
        second,
        s_second,
        units,
        values,
        num_hidden,
        nnz,
        int(rank),
        float(delta),
        ANTI=anti,
        BLOCK_K=block,
        TOKENS=rows_tokens(block),
        STAGES=stages_for(block, rows_tokens(block)),
        EXACT=exact,
        num_warps=num_warps_for(block),
    )

    # xx in two deterministic steps: partial sums over slices of the batch (enough programs to
    # fill the GPU), then the slices summed in order.
    splits = triton.cdiv(rows, UPDATE_ROWS_PER_SPLIT)
    unit_blocks = triton.cdiv(num_hidden, UPDATE_BLOCK_U)
    partial_xx = torch.empty((splits, num_hidden), dtype=torch.float32, device=device)
    _update_xx_kernel[(unit_blocks, splits)](
        winners,
        s_win,
        second,
        s_second,
        partial_xx,
        rows,
        num_hidden,
        float(delta),
        UPDATE_ROWS_PER_SPLIT,
        ANTI=anti,
        BLOCK_B=UPDATE_BLOCK_B,
        BLOCK_U=UPDATE_BLOCK_U,
        EXACT=exact,
        num_warps=4,
    )
    nx = torch.empty(num_hidden, dtype=torch.float32, device=device)
    _update_nx_kernel[(unit_blocks,)](partial_xx, nx, splits, num_hidden, BLOCK_U=UPDATE_BLOCK_U, num_warps=1)

    # Groups: the contributions stably sorted by (input id, unit), so each (input, unit) pair is
    # one run in bucket order (slot j and nnz + j both belong to indices[j]; slots in sample
    # order), summed once by _group_sums_kernel. bounds[i * blocks + kb] is the first group of
    # synapse row i at units kb * dblock and up.
    inputs = torch.cat([indices, indices]) if anti else indices
    keys, order = torch.sort(inputs * num_hidden + units.to(torch.int64), stable=True)
    values = values[order].contiguous()
    group_keys, counts = torch.unique_consecutive(keys, return_counts=True)
    groups = group_keys.shape[0]
    starts = torch.zeros(groups + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=starts[1:])
    group_units = (group_keys % num_hidden).to(torch.int32)
    sums = torch.empty(groups, dtype=torch.float32, device=device)
    if groups:
        _group_sums_kernel[(triton.cdiv(groups, GROUP_BLOCK),)](
            values, starts, sums, groups, BLOCK_G=GROUP_BLOCK, num_warps=1
        )

    dblock = ds_block(num_hidden)
    grid = (num_inputs, triton.cdiv(num_hidden, dblock))
    firsts = torch.arange(num_inputs, device=device)[:, None] * num_hidden + torch.arange(
        0, grid[1] * dblock, dblock, device=device
    )
    firsts = torch.cat([firsts.flatten(), torch.tensor([num_inputs * num_hidden], device=device)])
    bounds = torch.searchsorted(group_keys, firsts)
    partial = torch.empty(grid, dtype=torch.float32, device=device)
    args = (synapses_t, nx, bounds, group_units, sums, partial)
    for apply, nc in ((False, partial), (True, None)):
        if apply:
            nc = partial.amax().reshape(1)
        _update_ds_kernel[grid](
            *args,
            nc,
            float(lr),
            float(prec),
            float(tiny),
            num_hidden,
            APPLY=apply,
            BLOCK_K=dblock,
            CHUNK=ds_chunk(dblock),
            EXACT=exact,
            num_warps=num_warps_for(dblock),
        )
    return winners, s_win
