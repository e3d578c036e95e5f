"""Log-n attention: the decode kernels (a few queries against a long KV cache), flash-decoding style.

Generation past the training length is where log-n attention earns its keep, and there ``Lq`` is
1 (or a few draft tokens) while ``Lk`` is the whole cache. A 128-row prefill tile would be almost
all padding, and one program per (batch, head) would read the cache with a handful of warps. So:

* GQA packing: one program serves every query head of a key/value head, all their ``Lq`` rows
  stacked as the rows of one tile (row ``r`` is head ``r // Lq``, position ``r % Lq``), so the
  cache is read once per key/value head, not once per query head. Past ``MAX_ROWS`` packed rows
  the rows are cut into row blocks, one program each; the row blocks of a key/value head are
  neighbours on the grid's first axis, so they read the same cache chunk at about the same time
  (the later ones can then be served from L2).
* Split-K: the keys are cut into ``splits`` chunks, one program each, so that a single sequence
  still fills the GPU; each writes its chunk's normalised partial output and log-sum-exp, and
  ``logn_decode_combine_kernel`` merges the chunks per row.

Each row's ``n_i`` (and so its scale) comes from its absolute position ``i + Lk - Lq`` when causal,
or from the padding mask's prefix counts, exactly as in the prefill kernels. Dense layout only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logn_attention_rules import (
    RUNTIME_INTS,
    allowed,
    arch_family,
    block_d,
    dot,
    interpreting,
    row_length,
    row_scale,
    visible,
)

MAX_Q = 16  # the longest query block the dispatcher sends here
BLOCK_N = 64
MAX_ROWS = 64  # packed rows a tile; more take several row blocks


def _block_rows(rows: int, block_d: int = 128) -> int:
    # Two tile heights only, the two the static check compiles for every target: 16 (one token of
    # up to 16 query heads a KV head) and 64. Rows 17..63 run in the 64-row tile: the kernel is
    # bound by reading the cache, which costs the same for 32 rows as for 64 (a 64-row tile does
    # 64 flops a byte of k and v at d=128, a fifth of what an H100's tensor cores sustain per byte of
    # HBM), and a 32-row tile would be one more layout to keep unreplicated. Past 64 rows (e.g. 16
    # draft tokens of 8 query heads a KV head) the rows are cut into blocks of 64.
    # Heads of 256 take 16-row blocks only: the 64-row tile at d=256 kept a stack or replicated its
    # scores on sm_90 in every warp / stage count tried (16..48 bytes with 4 warps; 8 warps put two
    # warpgroups on 64 rows), and one token of a GQA group of up to 16 fits one 16-row block.
    return 16 if rows <= 16 or block_d > 128 else MAX_ROWS


def _block_d(head_dim: int) -> int:
    # At least 32 columns: with 16 the 16-row output tile (16 x 16) is narrower than any two mma
    # tiles, so Triton's layout for the chained dots (warps along M when M >= N) stacked all 4
    # warps on its 16 rows, each computing the same products (replicated; one warp would not, at a
    # quarter of the warps a program). At 32 the 4 warps split its columns, 8 each.
    # The extra 16 columns are zeros (masked loads read no more memory) in a tile this small.
    return max(32, block_d(head_dim))


def _num_stages(block_d: int, itemsize: int = 2, family: int = 80, block_r: int = 16) -> int:
    # ptxas keeps an 8-byte stack in the 3-stage d=64 form on sm_90 (at 72 registers); 2 is clean.
    # float32 k / v tiles are twice as large: two stages (64 keys x 128 x 4 B x 2 tensors x 2 = 128 KB
    # would pass sm_86's 99 KB, so d=128 float32 takes one there and on sm_80; sm_90 takes two, the
    # 4-warp 64-row tile kept a 16-byte stack with one). TF32 with 64 rows 32 wide on sm_80 kept
    # 24 bytes of stack (not spills) with two stages in the padding-mask form and 8 with three;
    # one is clean (190 registers).
    # 16-bit at d=256: three stages of 64-key k and v tiles (192 KB) pass sm_80's 163 KB; two (74 KB
    # at 16 rows, 4 warps) are clean on every target.
    if itemsize == 4:
        if family == 80 and block_d == 32 and block_r == 64:
            return 1
        return 2 if block_d <= 64 or family == 90 else 1
    return 2 if block_d <= 64 or block_d > 128 else 3


def _num_warps(block_r: int, block_d: int = 64, itemsize: int = 2, family: int = 80) -> int:
    # Four warps at least: with 16 rows Triton lays them along the columns (no replication from
    # 32 columns on, see _block_d), and one warp alone would hold the whole k and v tiles as mma
    # operands (spills at d=128). From 64 rows on, 16 rows a warp (64 a warpgroup on sm_90). But
    # float32 (TF32) at d=128 with 64 rows kept a 16..120-byte stack on 4 warps on sm_80 / sm_86:
    # 8 there (mma.sync lays them along the head dim: unreplicated, 181..208 registers). On sm_90
    # 8 warps would put two warpgroups on the 64 wgmma rows (replicated); 4 with two stages are
    # clean there (252..254 registers, 161 KB).
    if itemsize == 4 and block_d >= 128 and block_r >= 64 and family != 90:
        return 8
    return max(4, min(8, block_r // 16))


# Triton compiles an integer argument equal to 1 as a constant. For these kernels that is common
# (one token a step, Lq = 1; multi-query models, Hkv = 1; one split of a short cache) and the
# constant forms are not the code the static check compiles: the 64-row split kernel with Lq = 1
# kept an 8-byte stack on sm_86 and 24 bytes in TF32 on sm_90 where the general form has none
# (tests/gpu_compile.py, triton 3.9). So head counts, lengths, the number of splits and the lse
# strides stay runtime values (RUNTIME_INTS and splits); folding them saved a few integer
# operations a program, outside the key loop.
COMBINE_RUNTIME_INTS = RUNTIME_INTS + ("splits",)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def logn_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    prefix_ptr,
    part_o_ptr,
    part_lse_ptr,
    Hq,
    Hkv,
    Lq,
    Lk,
    D,
    chunk,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    base,
    inv_log_train,
    min_n,
    inv_sqrt_d,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    LOGN: tl.constexpr,
    CLIP: tl.constexpr,
    GRADMAX: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # part_o: (B * Hkv, splits, R, BLOCK_D) float32; part_lse: (B * Hkv, splits, R), where
    # R = BLOCK_R x row_blocks covers the packed rows.
    groups = Hq // Hkv
    row_blocks = tl.cdiv(groups * Lq, BLOCK_R)
    bh = tl.program_id(0) // row_blocks
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = row_blocks * BLOCK_R
    b = (bh // Hkv).to(tl.int64)  # 32-bit division, then widen
    hk = (bh % Hkv).to(tl.int64)
    r = tl.program_id(0) % row_blocks * BLOCK_R + tl.arange(0, BLOCK_R)
    pos = r % Lq  # query position of each packed row
    head = hk * groups + r // Lq
    row_ok = r < groups * Lq
    dcol = tl.arange(0, BLOCK_D)
    q_at = b * stride_qb + head.to(tl.int64) * stride_qh + pos * stride_qm
    q = tl.load(q_ptr + q_at[:, None] + dcol[None, :], mask=row_ok[:, None] & (dcol[None, :] < D), other=0.0)
    n = visible(pos, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
    sc = row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX) * 1.4426950408889634

    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_kb + hk * stride_kh
    lo = split * chunk
    hi = tl.minimum(lo + chunk, Lk)
    if CAUSAL:  # the last query row sees up to key Lk - 1; the first up to Lk - Lq
        full = tl.maximum(tl.minimum(hi, Lk - Lq + 1), lo)
    else:
        full = hi
    full = lo + (full - lo) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for start in range(lo, full, BLOCK_N):  # keys every row sees: no mask but padding
        cols = start + tl.arange(0, BLOCK_N)
        kv_at = cols[:, None] * stride_kn + dcol[None, :]
        if EVEN_D:
            k = tl.load(k_base + kv_at)
            v = tl.load(v_base + kv_at)
        else:
            k = tl.load(k_base + kv_at, mask=dcol[None, :] < D, other=0.0)
            v = tl.load(v_base + kv_at, mask=dcol[None, :] < D, other=0.0)
        s = dot(q, tl.trans(k), IEEE) * sc[:, None]
        if HAS_MASK:
            s = tl.where(allowed(pos, cols, b, Lq, Lk, mask_ptr, False, False, True), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    for start in range(full, hi, BLOCK_N):  # the chunk's ragged end and the causal diagonal
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < hi) & (dcol[None, :] < D)
        kv_at = cols[:, None] * stride_kn + dcol[None, :]
        k = tl.load(k_base + kv_at, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_at, mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), IEEE) * sc[:, None]
        ok = allowed(pos, cols, b, Lq, Lk, mask_ptr, False, CAUSAL, HAS_MASK) & (cols[None, :] < hi)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    empty = l_i == 0.0
    o = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), m_i * 0.6931471805599453 + tl.log(tl.where(empty, 1.0, l_i)))
    part = (bh.to(tl.int64) * splits + split) * rows + r
    tl.store(part_o_ptr + part[:, None] * BLOCK_D + dcol[None, :], o)
    tl.store(part_lse_ptr + part, lse)


@triton.jit(do_not_specialize=COMBINE_RUNTIME_INTS)
def logn_decode_combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    Hq,
    Hkv,
    Lq,
    D,
    splits,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_lb,
    stride_lh,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merges the splits of one (batch, key/value head, row block): per row, softmax-weighted by the
    splits' log-sum-exps (a split that saw no key has -inf and weight 0)."""
    groups = Hq // Hkv
    row_blocks = tl.cdiv(groups * Lq, BLOCK_R)
    bh = tl.program_id(0) // row_blocks
    rows = row_blocks * BLOCK_R
    b = (bh // Hkv).to(tl.int64)  # 32-bit division, then widen
    hk = (bh % Hkv).to(tl.int64)
    r = tl.program_id(0) % row_blocks * BLOCK_R + tl.arange(0, BLOCK_R)
    dcol = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for i in range(splits):
        m = tl.maximum(m, tl.load(part_lse_ptr + (bh.to(tl.int64) * splits + i) * rows + r))
    empty = m == float("-inf")
    shift = tl.where(empty, 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    o = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i in range(splits):
        part = (bh.to(tl.int64) * splits + i) * rows + r
        w = tl.exp(tl.load(part_lse_ptr + part) - shift)
        total += w
        o += w[:, None] * tl.load(part_o_ptr + part[:, None] * BLOCK_D + dcol[None, :])
    o = tl.where(empty[:, None], 0.0, o / tl.where(empty, 1.0, total)[:, None])
    lse = tl.where(empty, 0.0, m + tl.log(tl.where(empty, 1.0, total)))
    pos = r % Lq
    head = (hk * groups + r // Lq).to(tl.int64)
    row_ok = r < groups * Lq
    q_at = b * stride_qb + head * stride_qh + pos * stride_qm
    tl.store(
        out_ptr + q_at[:, None] + dcol[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dcol[None, :] < D),
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + pos, lse, mask=row_ok)


def num_splits(programs: int, lk: int, device: torch.device) -> int:
    """Enough chunks for about four programs per SM, given ``programs`` (key/value heads x row
    blocks) a chunk (the cache is read at full bandwidth only with many programs in flight; the
    merge re-reads about 3% of the cache's bytes at Lq=1, d=128, 32k keys), each at least one key tile. Under the
    interpreter: up to 4, so that the tests exercise the merge."""
    target = (
        4
        if interpreting() or device.type != "cuda"
        else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    )
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(lk, BLOCK_N), 128))


def launch(q, k, v, out, lse, mask_u8, prefix, scalars, flags) -> None:
    """``q (B, Hq, Lq <= MAX_Q, D)``, ``k, v (B, Hkv, Lk, D)``, contiguous; out like q, lse (B, Hq, Lq)."""
    b, hq, lq, _ = q.shape
    d = row_length(q.shape[-1])  # rows padded by the launchers
    hkv, lk = k.shape[1], k.shape[2]
    bd = _block_d(d)
    family = arch_family(q.device)
    block_r = _block_rows(hq // hkv * lq, bd)
    row_blocks = triton.cdiv(hq // hkv * lq, block_r)
    splits = num_splits(b * hkv * row_blocks, lk, q.device)
    chunk = triton.cdiv(triton.cdiv(lk, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(lk, chunk)
    part_o = torch.empty(b * hkv, splits, row_blocks * block_r, bd, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b * hkv, splits, row_blocks * block_r, dtype=torch.float32, device=q.device)
    rule = {key: flags[key] for key in ("CAUSAL", "HAS_MASK", "LOGN", "CLIP", "GRADMAX", "IEEE")}
    logn_decode_split_kernel[(b * hkv * row_blocks, splits)](
        q,
        k,
        v,
        mask_u8,
        prefix,
        part_o,
        part_lse,
        hq,
        hkv,
        lq,
        lk,
        d,
        chunk,
        *q.stride()[:3],
        *k.stride()[:3],
        *scalars,
        **rule,
        EVEN_D=d == bd,
        BLOCK_R=block_r,
        BLOCK_N=BLOCK_N,
        BLOCK_D=bd,
        num_warps=_num_warps(block_r, bd, q.element_size(), family),
        num_stages=_num_stages(bd, q.element_size(), family, block_r),
    )
    logn_decode_combine_kernel[(b * hkv * row_blocks,)](
        part_o,
        part_lse,
        out,
        lse,
        hq,
        hkv,
        lq,
        d,
        splits,
        *q.stride()[:3],
        *lse.stride()[:2],
        BLOCK_R=block_r,
        BLOCK_D=bd,
        num_warps=4,
    )
