"""The embedding anomaly (kexue.fm/archives/9736), the guard against it, and the embedding helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kexue
from kexue.optim import Lion, Tiger, embedding_param_groups, find_embedding_weights, tiger_param_groups
from tests.sign_optim.helpers import BACKENDS


def train_embedding(opt_cls, guard, backend, steps=300, **kw):
    """Tokens 0..29 appear every step; tokens 30..39 only in the first 5 steps, then never."""
    torch.manual_seed(0)
    emb = nn.Embedding(40, 8)
    target = torch.randn(40, 8)
    opt = opt_cls(embedding_param_groups(emb, drift_guard=guard), **kw)
    rare = torch.arange(30, 40)
    with kexue.use_backend(backend):
        for t in range(steps):
            tokens = torch.cat([torch.arange(30), rare]) if t < 5 else torch.arange(30)
            loss = ((emb(tokens) - target[tokens]) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t == 4:
                after_last_seen = emb.weight.detach()[rare].clone()
    return emb.weight.detach(), after_last_seen, rare


# 600 interpreted launches for Triton on a machine without GPU: in `make test-all` only.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in BACKENDS])
@pytest.mark.parametrize(
    "opt_cls, kw", [(Lion, dict(lr=0.05, weight_decay=0.1)), (Tiger, dict(lr=0.05, weight_decay=0.1, nan_guard=None))]
)
def test_embedding_drift_and_guard(backend, opt_cls, kw):
    weight, seen_last, rare = train_embedding(opt_cls, False, backend, **kw)
    fixed_point = 1 / kw["weight_decay"]  # |theta*| = 1/lambda per component
    drifted = weight[rare].abs()
    # Without the guard the absent rows are pushed by sign(stale momentum) towards +-1/lambda:
    assert drifted.min() > 0.5 * fixed_point, drifted.min()
    assert weight[rare].norm(dim=1).mean() > 3 * seen_last.norm(dim=1).mean()
    weight, seen_last, rare = train_embedding(opt_cls, True, backend, **kw)
    assert torch.equal(weight[rare], seen_last)  # with the guard: bit-identical since last seen
    assert weight[:30].abs().max() < 0.5 * fixed_point  # the frequent tokens train normally


def test_embedding_helpers():
    model = nn.ModuleDict(
        {"tok": nn.Embedding(10, 4), "bag": nn.EmbeddingBag(5, 4), "lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
    )
    assert {id(p) for p in find_embedding_weights(model)} == {id(model.tok.weight), id(model.bag.weight)}
    groups = embedding_param_groups(model, lr=1e-3)
    assert [len(g["params"]) for g in groups] == [4, 2] and groups[1]["embedding"] and groups[1]["lr"] == 1e-3
    tg = tiger_param_groups(model)
    kinds = {g["kind"]: [n for n, _ in g["params"]] for g in tg}
    assert kinds == {
        "matrix": ["lin.weight"],
        "embedding": ["tok.weight", "bag.weight"],
        "bias": ["lin.bias", "norm.bias"],
        "gamma": ["norm.weight"],
    }
    opt = Tiger(tg)
    assert opt.param_groups[1]["embedding"] is True
