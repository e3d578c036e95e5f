"""Hamming top-n by streaming the database in tiles with a running top-n per query.

A search over D codes never holds a (Q, D) matrix: each tile of the database gives (Q, tile)
keys ``distance * D + index``, which are merged with the running (Q, n) best keys. The keys are
unique, so the n smallest are fully determined: nearest first, distance ties to the lowest index
(the reference's order). Peak memory is O(Q n) plus one tile, whatever D.

:func:`stream_topk` is the merge, shared by the torch backend here and the Triton launcher (whose
kernel computes each tile's keys); :func:`hamming_topk_torch` is the torch backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Bytes one tile's scratch may take; a tile holds at least one database row.
TILE_BYTES = 32 << 20


def tile_rows(bytes_per_row: int) -> int:
    """Database rows per tile for ``bytes_per_row`` of scratch per row."""
    return max(1, TILE_BYTES // max(1, bytes_per_row))


def stream_topk(
    tile_keys: Callable[[int, int], Tensor], num_queries: int, num_codes: int, n: int, tile: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The n smallest keys over the database, tile by tile: ``tile_keys(d0, d1)`` returns the
    ``(Q, d1 - d0)`` int64 keys ``distance * num_codes + index`` of codes ``d0 .. d1-1``."""
    best = torch.empty((num_queries, 0), dtype=torch.int64, device=device)
    if n > 0:
        for d0 in range(0, num_codes, tile):
            candidates = torch.cat((best, tile_keys(d0, min(num_codes, d0 + tile))), dim=1)
            best = torch.topk(candidates, min(n, candidates.shape[1]), dim=1, largest=False, sorted=True).values
    return best // max(num_codes, 1), best % max(num_codes, 1)


def _bits(codes: Tensor) -> Tensor:
    """Packed uint8 codes ``(R, nb)`` -> their bits ``(R, 8 nb)`` as float32 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return ((codes[:, :, None] >> shifts) & 1).reshape(codes.shape[0], 8 * codes.shape[1]).to(torch.float32)


def hamming_topk_torch(queries: Tensor, database: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The torch backend: per tile, ``popcount(q ^ d) = |q| + |d| - 2 <q, d>`` on the unpacked
    bits, a float32 matmul of 0/1 values that is exact (every partial sum is an integer < 2**24)."""
    num_queries, num_codes = queries.shape[0], database.shape[0]
    q_bits = _bits(queries)
    q_count = q_bits.sum(1, keepdim=True)
    width = q_bits.shape[1]

    def tile_keys(d0: int, d1: int) -> Tensor:
        d_bits = _bits(database[d0:d1])
        dist = q_count + d_bits.sum(1)[None, :] - 2 * (q_bits @ d_bits.t())
        index = torch.arange(d0, d1, device=queries.device)
        return dist.to(torch.int64) * num_codes + index[None, :]

    # scratch per database row: its unpacked bits (4 * width bytes) and a column of float32
    # distances plus int64 keys and candidates for every query
    tile = tile_rows(4 * width + 24 * num_queries)
    return stream_topk(tile_keys, num_queries, num_codes, n, tile, queries.device)
