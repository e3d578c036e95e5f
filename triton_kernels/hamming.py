"""Hamming search in Triton: the n nearest packed codes of each query (contract: hamming_topk in
python/kexue/reference/biohash.py).

Hamming search reads the packed codes as 32-bit words (the launcher zero-pads each code to a
multiple of 4 bytes: zero bytes XOR to zero), computes popcount(q XOR d) with the SWAR bit trick
(no unpacking), and writes one int64 key ``distance * D + index`` per pair of one database tile;
each tile's keys are merged with the running n smallest (``torch.topk`` on unique keys, so the
order is fully determined: ties to the lowest index). Memory: O(Q n) plus one tile, whatever D.

One program per BLOCK_Q x BLOCK_D tile of (queries, database codes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .biohash import _interpreting

_HAMMING_BLOCK_Q = 16
_HAMMING_BLOCK_D = 64


@triton.jit
def _popcount32(x):
    """Bits set in each uint32 lane (SWAR: pairs, nibbles, bytes, then a multiply sums the bytes)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _hamming_keys_kernel(q_ptr, db_ptr, key_ptr, Q, D, WORDS, d0, TILE, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
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
    # The interpreter runs each program as numpy calls: fewer, wider programs (same results).
    block_q, block_d = (64, 2048) if _interpreting() else (_HAMMING_BLOCK_Q, _HAMMING_BLOCK_D)
    # a tile's scratch per database row: its keys and the merge's candidates and topk, per query
    tile = max(block_d, tile_rows(24 * Q) // block_d * block_d)
    keys = torch.empty((Q, min(tile, D)), dtype=torch.int64, device=queries.device)

    def tile_keys(d0: int, d1: int) -> torch.Tensor:
        dw = _as_words(database[d0:d1])  # padded words of this tile only
        width = d1 - d0
        grid = (triton.cdiv(Q, block_q), triton.cdiv(width, block_d))
        # the kernel indexes the tile's words from 0: pass D and d0 so keys carry global indices
        _hamming_keys_kernel[grid](
            qw, dw, keys, Q, D, qw.shape[1], d0, keys.shape[1], BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4
        )
        return keys[:, :width]

    return stream_topk(tile_keys, Q, D, n, keys.shape[1], queries.device)


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for ahead-of-time compilation (tests/gpu_compile.py).


def _aot_configs() -> list[dict]:
    configs = []
    configs.append(
        dict(
            name=f"hamming_keys {_HAMMING_BLOCK_Q}x{_HAMMING_BLOCK_D}",
            kernel=_hamming_keys_kernel,
            signature=dict(
                q_ptr="*i32",
                db_ptr="*i32",
                key_ptr="*i64",
                Q="i32",
                D="i32",
                WORDS="i32",
                d0="i32",
                TILE="i32",
                BLOCK_Q="constexpr",
                BLOCK_D="constexpr",
            ),
            constexprs=dict(BLOCK_Q=_HAMMING_BLOCK_Q, BLOCK_D=_HAMMING_BLOCK_D),
            num_warps=4,
        )
    )
    return configs


AOT_CONFIGS = _aot_configs()
