"""Steps 3 and 4 of the Triton BioHash learning step (triton_kernels/biohash_update.py explains all
four): each (input, unit) run of Hebbian contributions added once, and the weight change ds of a
synapse row computed (first pass: its max |ds|) and applied (second pass)."""

from __future__ import annotations

import triton
import triton.language as tl

from .biohash import _mul_rn


@triton.jit
def _group_sums_kernel(values_ptr, starts_ptr, sums_ptr, groups, BLOCK_G: tl.constexpr):
    """sums[g]: the values of group g (entries starts[g] .. starts[g + 1] - 1, in bucket order)
    added one after another from 0.0, as the CPU kernel adds them. One lane per group: a warp runs
    as many trips as its longest group, so the warp instructions never exceed the entries read."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    ok = g < groups
    first = tl.load(starts_ptr + g, mask=ok, other=0)
    count = tl.load(starts_ptr + g + 1, mask=ok, other=0) - first
    acc = tl.zeros((BLOCK_G,), tl.float32)
    for t in range(0, tl.max(count, axis=0)):
        more = t < count
        acc = tl.where(more, acc + tl.load(values_ptr + first + t, mask=more, other=0.0), acc)
    tl.store(sums_ptr + g, acc, mask=ok)


@triton.jit
def _update_ds_kernel(
    wt_ptr,
    nx_ptr,
    bounds_ptr,
    group_unit_ptr,
    group_sum_ptr,
    partial_ptr,
    nc_ptr,
    lr,
    prec,
    tiny,
    K,
    APPLY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    EXACT: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_K)
    cols = kb * BLOCK_K + lanes
    nx = tl.load(nx_ptr + cols, mask=cols < K, other=0.0)
    live = (cols < K) & (nx != 0)  # inactive units never change: not even read
    ptrs = wt_ptr + i * K + cols
    w = tl.load(ptrs, mask=live, other=0.0)

    # The Hebbian sums of this row's units in this block: groups g0 .. g1 - 1, one per distinct
    # unit, sorted by unit (their sums come from _group_sums_kernel, in bucket order). A histogram
    # of their units marks the lanes that have one; the k-th marked lane (in lane order) holds
    # group g0 + k, so an exclusive count of the marks gathers each lane's sum. Trips:
    # ceil(groups / CHUNK), at most BLOCK_K / CHUNK, none for a row the batch never touched.
    p = i * tl.num_programs(1) + kb
    g0 = tl.load(bounds_ptr + p)
    g1 = tl.load(bounds_ptr + p + 1)
    chunk = tl.arange(0, CHUNK)
    marks = tl.zeros((BLOCK_K,), tl.int32)
    for c0 in range(g0, g1, CHUNK):
        ok = c0 + chunk < g1
        unit = tl.load(group_unit_ptr + c0 + chunk, mask=ok, other=0)
        lane = tl.where(ok, unit - kb * BLOCK_K, 0)  # in range even where masked off
        marks += tl.histogram(lane, BLOCK_K, mask=ok)
    before = tl.cumsum(marks, axis=0) - marks
    hebb = tl.load(group_sum_ptr + g0 + before, mask=marks > 0, other=0.0)
    ds = tl.where(live, _mul_rn(nx, w, EXACT) + hebb, 0.0)

    if APPLY:
        nc = tl.load(nc_ptr)
        scale = tl.math.div_rn(lr, tl.maximum(nc, prec))
        change = _mul_rn(scale + tl.zeros_like(ds), ds, EXACT)
        tl.store(ptrs, w + change, mask=live & (tl.abs(change) > tiny))
    else:
        a = tl.abs(ds)
        tl.store(partial_ptr + i * tl.num_programs(1) + kb, tl.max(tl.where(a > 0, a, 0.0), axis=0))  # NaN -> 0
