"""Packed BioHash codes: the one definition of their layout, shared by the reference, the ops and FlyVec.

A code of K units is ``uint8 (ceil(K/8),)`` in little-endian bit order: unit mu is bit ``mu % 8``
(value ``1 << (mu % 8)``) of byte ``mu // 8``; unused high bits of the last byte are 0. On a
little-endian machine, 8 consecutive bytes read as one uint64 hold units ``64w .. 64w+63`` in bits
0..63 (the C++ and CUDA kernels read them so: csrc/include/kexue/biohash.h).
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_bytes(num_hidden: int) -> int:
    """Bytes of one packed code of ``num_hidden`` bits."""
    return (num_hidden + 7) // 8


def pack_bits(mask: Tensor) -> Tensor:
    """``(B, K)`` bool or 0/1 -> ``(B, ceil(K/8))`` uint8, little-endian bit order."""
    rows, num_hidden = mask.shape
    nb = code_bytes(num_hidden)
    bits = torch.zeros(rows, nb * 8, dtype=torch.int32, device=mask.device)
    bits[:, :num_hidden] = mask.to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=mask.device)
    return (bits.view(rows, nb, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(codes: Tensor, num_hidden: int) -> Tensor:
    """``(B, nb)`` uint8 -> ``(B, num_hidden)`` bool (inverse of :func:`pack_bits`)."""
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device)
    bits = (codes.to(torch.int32)[:, :, None] >> shifts) & 1
    return bits.reshape(codes.shape[0], -1)[:, :num_hidden].bool()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def hamming_distances(queries: Tensor, database: Tensor) -> Tensor:
    """``(Q, D)`` int64 Hamming distances between packed uint8 codes ``(Q, nb)`` and ``(D, nb)``."""
    x = torch.bitwise_xor(queries[:, None, :], database[None, :, :])
    return _POPCOUNT.to(queries.device)[x.long()].sum(-1)
