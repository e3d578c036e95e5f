"""Rotary position embedding angles: the one definition of the formula, shared by the float64
oracle (kexue.reference.global_pointer) and the cos/sin table of the GlobalPointer Triton launchers
(which may not import the oracle: tests/test_architecture_doc.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(length: int, head_size: int, base: float = 10000.0, dtype=torch.float64) -> Tensor:
    """``(L, d/2)`` angles ``p * base**(-2c/d)`` for position p and pair c (computed in float64)."""
    inv_freq = base ** (-2.0 * torch.arange(head_size // 2, dtype=torch.float64) / head_size)
    pos = torch.arange(length, dtype=torch.float64)
    return (pos[:, None] * inv_freq[None, :]).to(dtype)
