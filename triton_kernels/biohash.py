"""BioHash hashing in Triton: sparse gather-sum + winner-take-all + bit packing.

The learning step is triton_kernels/biohash_update.py, Hamming search triton_kernels/hamming.py.

The contract is python/kexue/reference/biohash.py (and csrc/include/kexue/biohash.h):

* Activations of a CSR row are summed token by token in row order, in float32, as
  ``acc + w * col`` with the product rounded on its own. On a GPU the product is a
  ``mul.rn.f32`` (inline PTX, which the compiler may not fuse into an FMA), so the sums round
  exactly like the reference's and the codes agree bit for bit. The interpreter multiplies in
  numpy, which never fuses.
* Winner-take-all without sorting: each activation becomes an unsigned key whose integer order
  is the ranking order (NaN above everything, -0.0 equal to +0.0); the k-th largest key is found
  by a radix select, one 256-bin histogram per byte from the top (4 rounds); units above it win, and units
  equal to it win in index order (an exclusive prefix count) until k are set: ties go to the
  lowest index.
* Packed codes: unit mu is bit ``mu % 8`` of byte ``mu // 8``.

One program per CSR row. Block sizes come from the shapes (not autotuned); ``AOT_CONFIGS`` lists
every configuration the launcher can pick.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 4096  # the largest K the hash kernel serves (BLOCK_K up to 4096)


def _interpreting() -> bool:
    """Whether kernels run in the Triton interpreter (numpy on the CPU), where no PTX exists."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Hashing.


@triton.jit
def _mul_rn(a, b, EXACT: tl.constexpr):
    """a * b rounded to float32 and never fused with a following add (see the module docstring)."""
    if EXACT:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
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
def _kth_largest_key(keys, in_row, k):
    """The k-th largest of the row's uint32 keys, by radix select: four rounds, one per byte from
    the top. Each round histograms that byte over the keys that share the bytes chosen so far
    (256 bins), and picks the byte value where the count from the top reaches the rank still
    sought; the keys in higher bins leave the search. Four histograms instead of 32 block-wide
    counting reductions (one per bit)."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((1,), tl.uint32)
    rank = tl.zeros((1,), tl.int32) + k  # the rank sought among the keys still in the search
    for r in tl.static_range(4):
        shift = 24 - 8 * r
        digit = ((keys >> shift) & 0xFF).to(tl.int32)
        if r == 0:
            match = in_row
        else:
            match = in_row & ((keys >> (shift + 8)) == (prefix >> (shift + 8)))
        hist = tl.histogram(digit, 256, mask=match)
        from_top = tl.cumsum(hist, 0, reverse=True)  # keys in the search with this byte or more
        # counts summed as float32 (exact below 2**24; an integer sum of a boolean vector is
        # lowered through a stack slot on sm_90)
        chosen = tl.sum(tl.where(from_top[None, :] >= rank[:, None], 1.0, 0.0), axis=1).to(tl.int32) - 1
        higher = tl.sum(tl.where(bins[None, :] > chosen[:, None], hist[None, :], 0), axis=1)
        rank -= higher
        prefix = prefix | (chosen.to(tl.uint32) << shift)
    return prefix


@triton.jit
def _gather_sum(
    ids_ptr,
    weights_ptr,
    wt_ptr,
    start,
    end,
    K,
    cols,
    in_row,
    TOKENS: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RAW: tl.constexpr,
    EXACT: tl.constexpr,
):
    """The row's activations: sum over tokens j in [start, end) of weights[j] * wt[ids[j], :], added
    in row order (the reference's order), TOKENS tokens a step; with RAW also the unweighted sum of
    the rows (the learning step's winner activations), else zeros. Returns ``(weighted, raw)``.

    Each step loads TOKENS ids and weights with one load, then the TOKENS rows of wt as one
    (TOKENS, BLOCK_K) tile with one load: no row's address waits for another row's data. Loads
    issued as plain registers loads were still serialized by ptxas (it reuses one set of registers
    for consecutive rows, so each row waited for the previous one's adds); the loop is therefore
    software-pipelined (``num_stages=STAGES``): the tiles of the next STAGES - 1 steps are copied
    into shared memory with 16-byte cp.async while this step adds, and the ids one stage before
    their rows. The adds stay in row order: row u of the tile is picked by a sum over the token
    axis in which every other token contributes -0.0, which leaves any float (signed zeros,
    infinities, NaN) unchanged, so the pick is exact (the token axis lies within each thread:
    nothing crosses threads and the compiler folds the -0.0 terms away).
    """
    tok = tl.arange(0, TOKENS)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    raw = tl.zeros((BLOCK_K,), tl.float32)
    for j0 in tl.range(start, end, TOKENS, num_stages=STAGES):
        ok = j0 + tok < end
        idx = tl.load(ids_ptr + j0 + tok, mask=ok, other=0).to(tl.int64)
        w = tl.load(weights_ptr + j0 + tok, mask=ok, other=0.0).to(tl.float32)
        tile = tl.load(wt_ptr + idx[:, None] * K + cols[None, :], mask=ok[:, None] & in_row[None, :], other=0.0).to(
            tl.float32
        )
        prod = _mul_rn(tile, w[:, None] + tl.zeros_like(tile), EXACT)
        for u in tl.static_range(TOKENS):
            term = tl.sum(tl.where(tok[:, None] == u, prod, -0.0), axis=0)
            acc = tl.where(j0 + u < end, acc + term, acc)
            if RAW:
                col = tl.sum(tl.where(tok[:, None] == u, tile, -0.0), axis=0)
                raw = tl.where(j0 + u < end, raw + col, raw)
    return acc, raw


@triton.jit
def _biohash_sparse_kernel(
    ids_ptr,
    offsets_ptr,
    weights_ptr,
    wt_ptr,
    out_ptr,
    K,
    k,
    out_stride,
    PACKED: tl.constexpr,
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

    acc, _ = _gather_sum(
        ids_ptr, weights_ptr, wt_ptr, start, end, K, cols, in_row, TOKENS, STAGES, BLOCK_K, False, EXACT
    )

    # Padding lanes get key 0, below every real key (the smallest real key is -inf's, 0x007FFFFF),
    # and stay out of every count.
    keys = tl.where(in_row, _order_key(acc), 0)
    threshold = _kth_largest_key(keys, in_row, k)
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


def num_warps_for(block: int, itemsize: int = 4, packed: bool = False) -> int:
    """One warp per 256 lanes, up to 8, with two exceptions where ptxas keeps an 8-byte stack frame
    in the aligned (JIT) form although registers are plenty (tests/gpu_compile.py): 512 lanes on
    two warps (float32 dense, sm_80), and packed codes of 4096 16-bit lanes on eight warps (sm_80;
    sixteen warps compile clean there, but not for dense codes on sm_90)."""
    if block == 512:
        return 4
    if block == 4096 and itemsize == 2 and packed:
        return 16
    return max(1, min(8, block // 256))


def tokens_per_step(block: int, num_warps: int) -> int:
    """Tokens gathered per step of the hash kernel's loop: rows in flight together. Each thread holds
    block / (32 * num_warps) lanes of every row of the (tokens, block) tile; 32 float32 tile registers
    per thread (8 rows of 4 lanes, one 128-bit load each) keep enough bytes in flight without
    spilling, at most 8 tokens (a CSR row of FlyVec is a window of about 10 to 30 tokens)."""
    lanes = max(1, block // (32 * num_warps))
    return max(1, min(8, 32 // lanes))


STAGE_BYTES = 16 * 1024  # one (tokens, block) tile of float32 at K <= 1024


def stages_for(block: int, tokens: int) -> int:
    """Pipeline depth of the gather loop: three tiles (two in flight while one is added) up to
    STAGE_BYTES a tile, two above (64 KB of shared memory at K <= 4096, within every target's
    limit). The shared-memory tile holds float32 rows whatever the synapses' dtype would allow,
    so the budget is the float32 one."""
    return 3 if tokens * block * 4 <= STAGE_BYTES else 2


def biohash_sparse(
    indices: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    synapses_t: torch.Tensor,
    k: int,
    packed: bool,
) -> torch.Tensor:
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
    warps = num_warps_for(block, synapses_t.element_size(), bool(packed))
    tokens = tokens_per_step(block, warps)
    _biohash_sparse_kernel[(rows,)](
        indices.contiguous(),
        offsets.contiguous(),
        weights.float().contiguous(),
        synapses_t.contiguous(),
        out,
        num_hidden,
        int(k),
        out.stride(0),
        PACKED=bool(packed),
        BLOCK_K=block,
        TOKENS=tokens,
        STAGES=stages_for(block, tokens),
        EXACT=not _interpreting(),
        num_warps=warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for ahead-of-time compilation (tests/gpu_compile.py).

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _aot_configs() -> list[dict]:
    configs = []
    blocks = [64 << i for i in range(7)]  # 64 .. 4096 = block_k(MAX_HIDDEN)
    assert blocks[-1] == block_k(MAX_HIDDEN)
    for dtype, ptr in _PTR.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        for packed in (True, False):
            for block in blocks:
                warps = num_warps_for(block, itemsize, packed)
                tokens = tokens_per_step(block, warps)
                configs.append(
                    dict(
                        name=f"biohash_sparse {str(dtype).removeprefix('torch.')} "
                        f"{'packed' if packed else 'dense'} K<={block} w{warps}",
                        kernel=_biohash_sparse_kernel,
                        signature=dict(
                            ids_ptr="*i64",
                            offsets_ptr="*i64",
                            weights_ptr="*fp32",
                            wt_ptr=ptr,
                            out_ptr="*u8",
                            K="i32",
                            k="i32",
                            out_stride="i32",
                            PACKED="constexpr",
                            BLOCK_K="constexpr",
                            TOKENS="constexpr",
                            STAGES="constexpr",
                            EXACT="constexpr",
                        ),
                        constexprs=dict(
                            PACKED=packed, BLOCK_K=block, TOKENS=tokens, STAGES=stages_for(block, tokens), EXACT=True
                        ),
                        num_warps=warps,
                        expect=["vector_loads"],  # the tile's 16-byte cp.async
                    )
                )
    return configs


AOT_CONFIGS = _aot_configs()
