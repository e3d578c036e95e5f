"""Helpers shared by the GlobalPointer test modules: random problems, the canonical float64 inputs."""

from __future__ import annotations

import torch

import kexue
from kexue.reference import global_pointer as ref

NATIVE = kexue.backends()["cpu"]["available"]
CPU_BACKENDS = ["cpu", "torch"] if NATIVE else ["torch"]


def make_problem(
    batch, length, types, d, *, shared=True, dtype=torch.float64, pad=True, tril=True, density=0.05, seed=0
):
    """Public-layout inputs (float64 values rounded to dtype) and dense labels on candidate spans."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, length, d) if shared else (batch, length, types, d)
    q = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    sb = torch.randn(batch, length, types, generator=g, dtype=torch.float64)
    eb = torch.randn(batch, length, types, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad and length > 1:
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        lengths[:1] = length  # one full row
        mask = torch.arange(length)[None, :] < lengths[:, None]
    ok = ref.span_mask(mask, batch, length, tril, "cpu").expand(batch, types, length, length)
    labels = (torch.rand(batch, types, length, length, generator=g) < density) & ok
    q, k, sb, eb = (t.to(dtype) for t in (q, k, sb, eb))
    return q, k, sb, eb, mask, labels


def canonical64(q, k, sb, eb):
    q4 = q.unsqueeze(1) if q.dim() == 3 else q.transpose(1, 2)
    k4 = k.unsqueeze(1) if k.dim() == 3 else k.transpose(1, 2)
    return q4.double(), k4.double(), sb.double().transpose(1, 2), eb.double().transpose(1, 2)


def _issue16_problem():
    g = torch.Generator().manual_seed(0)
    q, k, b = torch.randn(1, 9, 8, generator=g), torch.randn(1, 9, 8, generator=g), torch.randn(1, 9, 2, generator=g)
    m = torch.ones(1, 9, dtype=torch.bool)
    m[0, 7:] = False
    return q, k, b, m
