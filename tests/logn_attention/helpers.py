"""Helpers shared by the log-n attention test modules: the op modules, the backends to test, random
dense and packed inputs.
"""

from __future__ import annotations

import math
import sys

import torch

import kexue
import kexue.ops._logn_attention_ops  # noqa: F401  (the module of the custom ops)
import kexue.reference.logn_attention  # noqa: F401
from tests.conftest import triton_unavailable_reason

ops_mod = sys.modules["kexue.ops._logn_attention_ops"]
ref = sys.modules["kexue.reference.logn_attention"]
attn = kexue.ops.logn_attention


def _inputs(b, hq, hkv, lq, lk, d, dtype=torch.float64, seed=0, mask_p=None, full_row=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64) * 1.5
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    mask = None
    if mask_p is not None:
        mask = torch.rand(b, lk, generator=gen) < mask_p
        if full_row and b > 0:
            mask[0] = True  # batch 0: every key padded, every query row empty
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


# Backends that run on this machine's CPU tensors (triton is tested in test_triton.py).
CPU_BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lengths_q, lengths_k=None, hq=4, hkv=2, d=16, dtype=torch.float64, seed=0):
    """Random packed ``q, k, v`` (float64 values rounded to ``dtype``) and their offsets."""
    lengths_k = lengths_q if lengths_k is None else lengths_k
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, hq, d, generator=gen, dtype=torch.float64) * 1.5
    k = torch.randn(tk, hkv, d, generator=gen, dtype=torch.float64) * 1.5
    v = torch.randn(tk, hkv, d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), _offsets(lengths_q), _offsets(lengths_k)


BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []


def _filled(t, mask, value):
    """``t`` with every padded key (mask True) set to ``value`` (a huge one: the dtype's largest)."""
    if mask is None:
        return t
    if math.isfinite(value):
        value = max(-torch.finfo(t.dtype).max, min(value, torch.finfo(t.dtype).max))
    return t.masked_fill(mask[:, None, :, None], value)
