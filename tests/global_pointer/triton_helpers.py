"""Inputs and tiles shared by the GlobalPointer Triton test modules (imported after their triton skip)."""

from __future__ import annotations

import pytest
import torch

from kexue.reference import global_pointer as ref

pytest.importorskip("triton")
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)

SMALL = K.Tile(16, 16, 16, 4)
HOPPER = K.tile_for(128, torch.bfloat16, arch=90)  # sm_90's 64 x 64 wgmma tile, run here too
ROPE_NAMES = {0: None, 1: "interleaved", 2: "half"}


def problem(batch, heads, types, length, d, dtype, tril, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, heads, length, d, generator=g, dtype=torch.float64).to(dtype)
    sb = torch.randn(batch, types, length, generator=g, dtype=torch.float64).to(dtype)
    eb = torch.randn(batch, types, length, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if length > 2:
        mask[-1, length - length // 3 :] = False
    ok = ref.span_mask(mask, batch, length, tril, "cpu").expand(batch, types, length, length)
    labels = (torch.rand(batch, types, length, length, generator=g) < 0.1) & ok
    return q, k, sb, eb, mask, labels
