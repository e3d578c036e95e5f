"""BioHash in Triton: sparse gather-sum + winner-take-all + bit packing, and Hamming search.

The contract is python/kexue/reference/biohash.py (and csrc/include/kexue/biohash.h):

* Activations of a CSR row are summed token by token in row order, in float32, as
  ``acc + w * col`` with the product rounded on its own. On a GPU the product is a
  ``mul.rn.f32`` (inline PTX, which the compiler may not fuse into an FMA), so the sums round
  exactly like the reference's and the codes agree bit for bit. The interpreter multiplies in
  numpy, which never fuses.
* Winner-take-all without sorting: each activation becomes an unsigned key whose integer order
  is the ranking order (NaN above everything, -0.0 equal to +0.0); the k-th largest key is found
  bit by bit from the top (32 counting reductions over the row); units above it win, and units
  equal to it win in index order (an exclusive prefix count) until k are set: ties go to the
  lowest index.
* Packed codes: unit mu is bit ``mu % 8`` of byte ``mu // 8``.

Hamming search reads the packed codes as 32-bit words (the launcher zero-pads each code to a
multiple of 4 bytes: zero bytes XOR to zero), computes popcount(q XOR d) with the SWAR bit trick
(no unpacking), and writes one int64 key ``distance * D + index`` per pair of one database tile;
each tile's keys are merged with the running n smallest (``torch.topk`` on unique keys, so the
order is fully determined: ties to the lowest index). Memory: O(Q n) plus one tile, whatever D.

One program per CSR row (hash) or per BLOCK_Q x BLOCK_D tile (Hamming). Block sizes come from
the shapes (not autotuned); ``AOT_CONFIGS`` lists every configuration the launchers can pick.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 4096  # the largest K the hash kernel serves (BLOCK_K up to 4096)
_HAMMING_BLOCK_Q = 16
_HAMMING_BLOCK_D = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Hashing.


@triton.jit
def _mul_rn(a, b, EXACT: tl.constexpr):
    """a * b rounded to float32 and never fused with a following add (see the module docstring)."""
    if EXACT:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _order_key(a):
    """uint32 key whose integer order is the ranking order of the float32 ``a``."""
    bits = a.to(tl.uint32, bitcast=True)
    sign = tl.full(bits.shape, 0x80000000, tl.uint32)
    bits = tl.where(bits == sign, 0, bits)  # -0.0 ranks as +0.0
    key = tl.where((bits & sign) != 0, bits ^ 0xFFFFFFFF, bits | sign)
    return tl.where(a != a, 0xFFFFFFFF, key)  # NaN above every number


@triton.jit
def _biohash_sparse_kernel(ids_ptr, offsets_ptr, weights_ptr, wt_ptr, out_ptr, K, k, out_stride,
                           PACKED: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    cols = tl.arange(0, BLOCK_K)
    in_row = cols < K

    # Gather-sum, token by token in row order (the reference's order).
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for j in range(start, end):
        idx = tl.load(ids_ptr + j).to(tl.int64)
        w = tl.load(weights_ptr + j).to(tl.float32)
        col = tl.load(wt_ptr + idx * K + cols, mask=in_row, other=0.0).to(tl.float32)
        acc = acc + _mul_rn(col, w + tl.zeros_like(col), EXACT)

    # The k-th largest key, bit by bit. Padding lanes get key 0, below every real key (the
    # smallest real key is -inf's, 0x007FFFFF), so they are never counted.
    keys = tl.where(in_row, _order_key(acc), 0)
    threshold = tl.zeros((1,), tl.uint32)
    for b in tl.static_range(31, -1, -1):
        candidate = threshold | (1 << b)
        # counts summed as float32 (exact below 2**24; an integer sum of a boolean vector is
        # lowered through a stack slot on sm_90)
        count = tl.sum(tl.where(keys[None, :] >= candidate[:, None], 1.0, 0.0), axis=1)
        threshold = tl.where(count >= k, candidate, threshold)
    above = keys > threshold
    greater = tl.sum(tl.where(above, 1.0, 0.0), axis=0)
    tied = keys == threshold
    tied_before = tl.cumsum(tl.where(tied, 1.0, 0.0), axis=0) - tl.where(tied, 1.0, 0.0)
    win = above | (tied & (tied_before < k - greater))

    out_row = out_ptr + row * out_stride
    if PACKED:
        bits = tl.reshape(tl.where(win, 1.0, 0.0), (BLOCK_K // 8, 8))
        weight = tl.exp2(tl.arange(0, 8).to(tl.float32))
        byte = tl.sum(bits * weight[None, :], axis=1).to(tl.uint8)  # exact: at most 255
        nb = (K + 7) // 8
        slots = tl.arange(0, BLOCK_K // 8)
        tl.store(out_row + slots, byte, mask=slots < nb)
    else:
        tl.store(out_row + cols, win.to(tl.uint8), mask=in_row)


def block_k(num_hidden: int) -> int:
    """Lanes per row: the next power of two, at least 64 (so a packed code is whole bytes)."""
    return max(64, triton.next_power_of_2(num_hidden))


def num_warps_for(block: int) -> int:
    return max(1, min(8, block // 256))


def biohash_sparse(indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                   synapses_t: torch.Tensor, k: int, packed: bool) -> torch.Tensor:
    """Codes of CSR rows (contract: kexue.ops.biohash). ``synapses_t (N, K)`` contiguous,
    float16/bfloat16/float32; weights float32 or None."""
    rows = offsets.shape[0] - 1
    num_hidden = synapses_t.shape[1]
    if num_hidden > MAX_HIDDEN:
        raise ValueError(f"the Triton biohash kernel serves K <= {MAX_HIDDEN}, got K = {num_hidden}")
    width = (num_hidden + 7) // 8 if packed else num_hidden
    out = torch.empty((rows, width), dtype=torch.uint8, device=synapses_t.device)
    if rows == 0:
        return out
    if weights is None:  # one kernel for both: a weight of 1 changes no product
        weights = torch.ones(indices.shape[0], dtype=torch.float32, device=indices.device)
    block = block_k(num_hidden)
    _biohash_sparse_kernel[(rows,)](indices.contiguous(), offsets.contiguous(), weights.float().contiguous(),
                                    synapses_t.contiguous(), out, num_hidden, int(k), out.stride(0),
                                    PACKED=bool(packed), BLOCK_K=block, EXACT=not _interpreting(),
                                    num_warps=num_warps_for(block))
    return out


# ---------------------------------------------------------------------------------------------
# Hamming search.


@triton.jit
def _popcount32(x):
    """Bits set in each uint32 lane (SWAR: pairs, nibbles, bytes, then a multiply sums the bytes)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _hamming_keys_kernel(q_ptr, db_ptr, key_ptr, Q, D, WORDS, d0, TILE,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys ``distance * D + index`` of database codes ``d0 .. d0 + TILE - 1`` (clipped to D) for
    every query, into the ``(Q, TILE)`` tile buffer; ``db_ptr`` holds that tile's codes only."""
    pid_q = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    local = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ds = d0 + local
    q_ok, d_ok = qs < Q, (local < TILE) & (ds < D)
    dist = tl.zeros((BLOCK_Q, BLOCK_D), tl.uint32)
    for w in range(0, WORDS):
        qw = tl.load(q_ptr + qs * WORDS + w, mask=q_ok, other=0).to(tl.uint32, bitcast=True)
        dw = tl.load(db_ptr + local * WORDS + w, mask=d_ok, other=0).to(tl.uint32, bitcast=True)
        dist += _popcount32(qw[:, None] ^ dw[None, :])
    key = dist.to(tl.int64) * D + ds[None, :]
    tl.store(key_ptr + qs[:, None] * TILE + local[None, :], key, mask=q_ok[:, None] & d_ok[None, :])


def _as_words(codes: torch.Tensor) -> torch.Tensor:
    """Packed uint8 codes ``(R, nb)`` as int32 words ``(R, ceil(nb/4))``, zero-padded."""
    rows, nb = codes.shape
    words = (nb + 3) // 4
    if words * 4 != nb:
        codes = torch.nn.functional.pad(codes, (0, words * 4 - nb))
    return codes.contiguous().view(torch.int32)


def hamming_topk(queries: torch.Tensor, database: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distances, indices)``, ``(Q, n)`` int64, nearest first, ties to the lowest index.

    The database is streamed in tiles (kexue.ops._hamming_tiles): the kernel writes one tile's
    keys, which are merged with the running top-n, so memory is O(Q n) plus one tile whatever D."""
    from kexue.ops._hamming_tiles import stream_topk, tile_rows

    Q, D = queries.shape[0], database.shape[0]
    if Q == 0 or n == 0:
        empty = torch.empty((Q, n), dtype=torch.int64, device=queries.device)
        return empty, empty.clone()
    qw = _as_words(queries)
    # a tile's scratch per database row: its keys and the merge's candidates and topk, per query
    tile = max(_HAMMING_BLOCK_D, tile_rows(24 * Q) // _HAMMING_BLOCK_D * _HAMMING_BLOCK_D)
    keys = torch.empty((Q, min(tile, D)), dtype=torch.int64, device=queries.device)

    def tile_keys(d0: int, d1: int) -> torch.Tensor:
        dw = _as_words(database[d0:d1])  # padded words of this tile only
        width = d1 - d0
        grid = (triton.cdiv(Q, _HAMMING_BLOCK_Q), triton.cdiv(width, _HAMMING_BLOCK_D))
        # the kernel indexes the tile's words from 0: pass D and d0 so keys carry global indices
        _hamming_keys_kernel[grid](qw, dw, keys, Q, D, qw.shape[1], d0, keys.shape[1],
                                   BLOCK_Q=_HAMMING_BLOCK_Q, BLOCK_D=_HAMMING_BLOCK_D, num_warps=4)
        return keys[:, :width]

    return stream_topk(tile_keys, Q, D, n, keys.shape[1], queries.device)


# ---------------------------------------------------------------------------------------------
# The learning step (contract: biohash_update_cpu in csrc/cpu/biohash.cpp and the reference's
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
# 3. (torch) the contributions stably sorted by input id, and each input's bucket of them:
#    every element then sums its contributions in the CPU kernel's order (winners in sample
#    order, then ranked units), without atomics and without an (N, K) scratch.
# 4. _update_ds_kernel twice, one program per row i of synapses_t (and block of units):
#    ds[i, mu] = nx[mu] * W[i, mu] + (sum of the bucket's values for mu) on active units (0 on
#    the others). The first pass writes each program's max |ds| (a partial; torch's amax makes
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
def _update_rows_kernel(ids_ptr, offsets_ptr, weights_ptr, wt_ptr, winners_ptr, s_win_ptr, second_ptr,
                        s_second_ptr, unit_ptr, value_ptr, K, nnz, rank, delta,
                        ANTI: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    cols = tl.arange(0, BLOCK_K)
    in_row = cols < K

    # Raw (winner) and scaled (update) activations, token by token in row order.
    raw = tl.zeros((BLOCK_K,), tl.float32)
    scaled = tl.zeros((BLOCK_K,), tl.float32)
    for j in range(start, end):
        idx = tl.load(ids_ptr + j).to(tl.int64)
        w = tl.load(weights_ptr + j)
        col = tl.load(wt_ptr + idx * K + cols, mask=in_row, other=0.0)
        raw = raw + col
        scaled = scaled + _mul_rn(col, w + tl.zeros_like(col), EXACT)

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
def _update_xx_kernel(winners_ptr, s_win_ptr, second_ptr, s_second_ptr, partial_ptr, rows, K, delta,
                      rows_per_split, ANTI: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr,
                      EXACT: tl.constexpr):
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
            s = _mul_rn(-delta + tl.zeros((BLOCK_B,), tl.float32),
                        tl.load(s_second_ptr + bs, mask=ok, other=0.0), EXACT)
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


@triton.jit
def _update_ds_kernel(wt_ptr, nx_ptr, bucket_ptr, unit_ptr, value_ptr, partial_ptr, nc_ptr, lr, prec, tiny, K,
                      APPLY: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    nx = tl.load(nx_ptr + cols, mask=cols < K, other=0.0)
    live = (cols < K) & (nx != 0)  # inactive units never change: not even read
    ptrs = wt_ptr + i * K + cols
    w = tl.load(ptrs, mask=live, other=0.0)

    # The Hebbian sum of this input's bucket, in bucket order (the CPU kernel's order).
    hebb = tl.zeros((BLOCK_K,), tl.float32)
    for s in range(tl.load(bucket_ptr + i), tl.load(bucket_ptr + i + 1)):
        unit = tl.load(unit_ptr + s)
        value = tl.load(value_ptr + s)
        hebb = tl.where(cols == unit, hebb + value, hebb)
    ds = tl.where(live, _mul_rn(nx, w, EXACT) + hebb, 0.0)

    if APPLY:
        nc = tl.load(nc_ptr)
        scale = tl.math.div_rn(lr, tl.maximum(nc, prec))
        change = _mul_rn(scale + tl.zeros_like(ds), ds, EXACT)
        tl.store(ptrs, w + change, mask=live & (tl.abs(change) > tiny))
    else:
        a = tl.abs(ds)
        tl.store(partial_ptr + i * tl.num_programs(1) + kb, tl.max(tl.where(a > 0, a, 0.0), axis=0))  # NaN -> 0


UPDATE_BLOCK_B = 64
UPDATE_BLOCK_U = 32
UPDATE_ROWS_PER_SPLIT = 256  # rows of the batch per xx program
MAX_DS_BLOCK = 1024


def ds_block(num_hidden: int) -> int:
    """Lanes per program of the ds passes: the row's units, up to MAX_DS_BLOCK."""
    return min(block_k(num_hidden), MAX_DS_BLOCK)


def biohash_update(indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                   synapses_t: torch.Tensor, lr: float, delta: float, rank: int, prec: float,
                   tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    _update_rows_kernel[(rows,)](indices, offsets, weights, synapses_t, winners, s_win, second, s_second, units,
                                 values, num_hidden, nnz, int(rank), float(delta), ANTI=anti, BLOCK_K=block,
                                 EXACT=exact, num_warps=num_warps_for(block))

    # xx in two deterministic steps: partial sums over slices of the batch (enough programs to
    # fill the GPU), then the slices summed in order.
    splits = triton.cdiv(rows, UPDATE_ROWS_PER_SPLIT)
    unit_blocks = triton.cdiv(num_hidden, UPDATE_BLOCK_U)
    partial_xx = torch.empty((splits, num_hidden), dtype=torch.float32, device=device)
    _update_xx_kernel[(unit_blocks, splits)](
        winners, s_win, second, s_second, partial_xx, rows, num_hidden, float(delta), UPDATE_ROWS_PER_SPLIT,
        ANTI=anti, BLOCK_B=UPDATE_BLOCK_B, BLOCK_U=UPDATE_BLOCK_U, EXACT=exact, num_warps=4)
    nx = torch.empty(num_hidden, dtype=torch.float32, device=device)
    _update_nx_kernel[(unit_blocks,)](partial_xx, nx, splits, num_hidden, BLOCK_U=UPDATE_BLOCK_U, num_warps=1)

    # Buckets: contributions stably sorted by input id (slot j and nnz + j both belong to indices[j]).
    inputs = torch.cat([indices, indices]) if anti else indices
    sorted_inputs, order = torch.sort(inputs, stable=True)
    units, values = units[order].contiguous(), values[order].contiguous()
    bucket = torch.searchsorted(sorted_inputs, torch.arange(num_inputs + 1, device=device))

    dblock = ds_block(num_hidden)
    grid = (num_inputs, triton.cdiv(num_hidden, dblock))
    partial = torch.empty(grid, dtype=torch.float32, device=device)
    args = (synapses_t, nx, bucket, units, values, partial)
    _update_ds_kernel[grid](*args, partial, float(lr), float(prec), float(tiny), num_hidden, APPLY=False,
                            BLOCK_K=dblock, EXACT=exact, num_warps=num_warps_for(dblock))
    nc = partial.amax().reshape(1)
    _update_ds_kernel[grid](*args, nc, float(lr), float(prec), float(tiny), num_hidden, APPLY=True,
                            BLOCK_K=dblock, EXACT=exact, num_warps=num_warps_for(dblock))
    return winners, s_win


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for ahead-of-time compilation (tests/gpu_compile.py).

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _aot_configs() -> list[dict]:
    configs = []
    blocks = [64 << i for i in range(7)]  # 64 .. 4096 = block_k(MAX_HIDDEN)
    assert blocks[-1] == block_k(MAX_HIDDEN)
    for dtype, ptr in _PTR.items():
        for packed in (True, False):
            for block in blocks:
                configs.append(dict(
                    name=f"biohash_sparse {str(dtype).removeprefix('torch.')} "
                         f"{'packed' if packed else 'dense'} K<={block} w{num_warps_for(block)}",
                    kernel=_biohash_sparse_kernel,
                    signature=dict(ids_ptr="*i64", offsets_ptr="*i64", weights_ptr="*fp32", wt_ptr=ptr,
                                   out_ptr="*u8", K="i32", k="i32", out_stride="i32", PACKED="constexpr",
                                   BLOCK_K="constexpr", EXACT="constexpr"),
                    constexprs=dict(PACKED=packed, BLOCK_K=block, EXACT=True),
                    num_warps=num_warps_for(block),
                ))
    for anti in (False, True):
        for block in blocks:
            configs.append(dict(
                name=f"update_rows {'anti ' if anti else ''}K<={block} w{num_warps_for(block)}",
                kernel=_update_rows_kernel,
                signature=dict(ids_ptr="*i64", offsets_ptr="*i64", weights_ptr="*fp32", wt_ptr="*fp32",
                               winners_ptr="*i64", s_win_ptr="*fp32", second_ptr="*i64", s_second_ptr="*fp32",
                               unit_ptr="*i32", value_ptr="*fp32", K="i32", nnz="i32", rank="i32", delta="fp32",
                               ANTI="constexpr", BLOCK_K="constexpr", EXACT="constexpr"),
                constexprs=dict(ANTI=anti, BLOCK_K=block, EXACT=True),
                num_warps=num_warps_for(block),
            ))
        configs.append(dict(
            name=f"update_xx {'anti ' if anti else ''}{UPDATE_BLOCK_B}x{UPDATE_BLOCK_U}",
            kernel=_update_xx_kernel,
            signature=dict(winners_ptr="*i64", s_win_ptr="*fp32", second_ptr="*i64", s_second_ptr="*fp32",
                           partial_ptr="*fp32", rows="i32", K="i32", delta="fp32", rows_per_split="i32",
                           ANTI="constexpr", BLOCK_B="constexpr", BLOCK_U="constexpr", EXACT="constexpr"),
            constexprs=dict(ANTI=anti, BLOCK_B=UPDATE_BLOCK_B, BLOCK_U=UPDATE_BLOCK_U, EXACT=True),
            num_warps=4,
        ))
    configs.append(dict(
        name=f"update_nx {UPDATE_BLOCK_U}",
        kernel=_update_nx_kernel,
        signature=dict(partial_ptr="*fp32", nx_ptr="*fp32", splits="i32", K="i32", BLOCK_U="constexpr"),
        constexprs=dict(BLOCK_U=UPDATE_BLOCK_U),
        num_warps=1,
    ))
    for apply in (False, True):
        for block in [b for b in blocks if b <= MAX_DS_BLOCK]:
            configs.append(dict(
                name=f"update_ds {'apply' if apply else 'max'} K<={block} w{num_warps_for(block)}",
                kernel=_update_ds_kernel,
                signature=dict(wt_ptr="*fp32", nx_ptr="*fp32", bucket_ptr="*i64", unit_ptr="*i32",
                               value_ptr="*fp32", partial_ptr="*fp32", nc_ptr="*fp32", lr="fp32", prec="fp32",
                               tiny="fp32", K="i32", APPLY="constexpr", BLOCK_K="constexpr", EXACT="constexpr"),
                constexprs=dict(APPLY=apply, BLOCK_K=block, EXACT=True),
                num_warps=num_warps_for(block),
            ))
    configs.append(dict(
        name=f"hamming_keys {_HAMMING_BLOCK_Q}x{_HAMMING_BLOCK_D}",
        kernel=_hamming_keys_kernel,
        signature=dict(q_ptr="*i32", db_ptr="*i32", key_ptr="*i64", Q="i32", D="i32", WORDS="i32", d0="i32",
                       TILE="i32", BLOCK_Q="constexpr", BLOCK_D="constexpr"),
        constexprs=dict(BLOCK_Q=_HAMMING_BLOCK_Q, BLOCK_D=_HAMMING_BLOCK_D),
        num_warps=4,
    ))
    return configs


AOT_CONFIGS = _aot_configs()
