"""GlobalPointer modules: EfficientGlobalPointer, GlobalPointer and GPLinker.

The layers are checked against the bert4torch layers' computation written out here from their
source (bert4torch 0.6, bert4torch/layers/global_point.py), with the same weights; and, when the
bert4torch package is installed, against its own layer classes, loaded file by file (importing
the package pulls in tokenizers and torchvision, which these tests do not need).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types

import pytest
import torch
from torch import nn

import kexue
from kexue.nn import EfficientGlobalPointer, GlobalPointer, GPLinker
from kexue.reference import global_pointer as ref
from tests.helpers import rel_err

NATIVE = kexue.backends()["cpu"]["available"]
CPU_BACKENDS = ["cpu", "torch"] if NATIVE else ["torch"]


def bert4torch_masking(logits, mask, tril_mask):
    """bert4torch: padding rows and columns to -inf, then 1e12 subtracted below the diagonal."""
    if mask is not None:
        m = mask.float()
        logits = logits.masked_fill((1 - m[:, None, :, None]).bool(), -math.inf)
        logits = logits.masked_fill((1 - m[:, None, None, :]).bool(), -math.inf)
    if tril_mask:
        logits = logits - torch.tril(torch.ones_like(logits), -1) * 1e12
    return logits


def bert4torch_egp(layer, x, mask):
    """bert4torch's EfficientGlobalPointer.forward, transcribed (contiguous q/k halves, adjacent RoPE,
    bias channels (start, end) per type, halved)."""
    hs, heads = layer.head_size, layer.heads
    h = layer.p_dense(x)
    qw, kw = h[..., :hs], h[..., hs:]
    if layer.RoPE:
        qw, kw = ref.apply_rope(qw, "interleaved"), ref.apply_rope(kw, "interleaved")
    logits = torch.einsum("bmd,bnd->bmn", qw, kw) / hs**0.5
    bias = torch.stack(torch.chunk(layer.q_dense(h), heads, dim=-1), dim=-2).transpose(1, 2) / 2
    logits = logits.unsqueeze(1) + bias[..., :1] + bias[..., 1:].transpose(2, 3)
    return bert4torch_masking(logits, mask, layer.tril_mask)


def bert4torch_gp(layer, x, mask):
    """bert4torch's GlobalPointer.forward, transcribed (scale applied last)."""
    hs, heads = layer.head_size, layer.heads
    h = torch.stack(torch.chunk(layer.dense(x), heads, dim=-1), dim=-2)
    qw, kw = h[..., :hs], h[..., hs:]
    if layer.RoPE:
        qw = ref.apply_rope(qw.transpose(1, 2), "interleaved").transpose(1, 2)
        kw = ref.apply_rope(kw.transpose(1, 2), "interleaved").transpose(1, 2)
    logits = torch.einsum("bmhd,bnhd->bhmn", qw, kw)
    return bert4torch_masking(logits, mask, layer.tril_mask) / hs**0.5


def same_scores(ours, theirs):
    """Equal where both are real scores; masked (-inf, or ~-1e12 below the diagonal) together."""
    masked_ours = ~torch.isfinite(ours)
    masked_theirs = ~torch.isfinite(theirs) | (theirs < -1e10)
    assert torch.equal(masked_ours, masked_theirs)
    return rel_err(torch.where(masked_ours, 0.0, ours), torch.where(masked_theirs, 0.0, theirs))


def inputs(batch=3, length=13, hidden=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, hidden, generator=g, dtype=torch.float64)
    mask = (torch.arange(length)[None] < torch.tensor([length, 9, 4])[:batch, None]).long()
    return x, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [EfficientGlobalPointer, GlobalPointer])
@pytest.mark.parametrize("rope,tril", [(True, True), (False, False)])
def test_layers_match_bert4torch_computation(backend, cls, rope, tril):
    torch.manual_seed(1)
    layer = cls(10, 3, 8, RoPE=rope, tril_mask=tril).double()
    x, mask = inputs()
    expected = (bert4torch_egp if cls is EfficientGlobalPointer else bert4torch_gp)(layer, x, mask)
    with kexue.use_backend(backend):
        assert same_scores(layer(x, mask), expected) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_and_decode_through_the_layer(backend):
    torch.manual_seed(2)
    layer = EfficientGlobalPointer(10, 3, 8).double()
    x, mask = inputs()
    ok = ref.span_mask(mask.bool(), 3, 13, True, "cpu").expand(3, 3, 13, 13)
    labels = (torch.rand(3, 3, 13, 13, generator=torch.Generator().manual_seed(0)) < 0.1) & ok
    with kexue.use_backend(backend):
        loss = layer.loss(x, labels, mask)
        scores = layer(x, mask)
        index, score = layer.decode(x, mask, threshold=0.0)
    expected = ref.multilabel_crossentropy(scores.flatten(-2), labels.flatten(-2)).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-12)
    assert torch.equal(index, (scores > 0).nonzero())
    # gradients reach the weights
    loss.backward()
    assert layer.p_dense.weight.grad.abs().sum() > 0 and layer.q_dense.bias.grad.abs().sum() > 0


def test_load_bert4torch_state_dict():
    torch.manual_seed(3)

    class Bert4torchLikeEGP(nn.Module):  # the parameter names of bert4torch's layer
        def __init__(self):
            super().__init__()
            self.p_dense = nn.Linear(10, 16)
            self.q_dense = nn.Linear(16, 6)
            self.register_buffer("position_embedding.inv_freq".replace(".", "_"), torch.zeros(1), persistent=False)

    src = Bert4torchLikeEGP().double()
    layer = EfficientGlobalPointer(10, 3, 8).double()
    layer.load_bert4torch(src)
    assert torch.equal(layer.p_dense.weight, src.p_dense.weight) and torch.equal(layer.q_dense.bias, src.q_dense.bias)
    state = {**src.state_dict(), "position_embedding.inv_freq": torch.zeros(4)}
    layer2 = EfficientGlobalPointer(10, 3, 8).double()
    layer2.load_bert4torch(state)
    x, mask = inputs()
    assert torch.equal(layer(x, mask), layer2(x, mask))


def test_constructor_checks():
    with pytest.raises(ValueError, match="head_size"):
        EfficientGlobalPointer(10, 3, 7)
    with pytest.raises(ValueError, match="heads"):
        GlobalPointer(10, 0, 8)
    GlobalPointer(10, 2, 7, RoPE=False)  # odd head size is fine without RoPE
    EfficientGlobalPointer(10, 2, 8, max_len=512)  # older bert4torch keyword accepted


# ---------------------------------------------------------------------------------------------
# GPLinker.


def test_gplinker_loss_and_decode():
    torch.manual_seed(4)
    model = GPLinker(10, predicates=3, head_size=8).double()
    assert model.head.RoPE is False and model.head.tril_mask is False and model.entity.tril_mask
    x, mask = inputs()
    ent, head, tail = model(x, mask)
    assert ent.shape == (3, 2, 13, 13) and head.shape == (3, 3, 13, 13)
    # labels: one triple in sample 0: subject (1, 2), predicate 1, object (5, 7)
    ent_labels = torch.tensor([[0, 0, 1, 2], [0, 1, 5, 7]])
    head_labels = torch.tensor([[0, 1, 1, 5]])
    tail_labels = torch.tensor([[0, 1, 2, 7]])
    loss = model.loss(x, ent_labels, head_labels, tail_labels, mask)
    expected = 0
    for scores, lab in ((ent, ent_labels), (head, head_labels), (tail, tail_labels)):
        dense = torch.zeros(scores.shape, dtype=torch.bool)
        dense[tuple(lab.T)] = True
        expected = expected + ref.multilabel_crossentropy(scores.flatten(-2), dense.flatten(-2)).sum(1).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-12)

    # decoding against a brute-force join of the dense scores
    triples = model.decode(x, mask)
    for b in range(3):
        brute = set()
        subj = (ent[b, 0] > 0).nonzero().tolist()
        obj = (ent[b, 1] > 0).nonzero().tolist()
        for sh, st in subj:
            for oh, ot in obj:
                for p in range(3):
                    if head[b, p, sh, oh] > 0 and tail[b, p, st, ot] > 0:
                        brute.add(((sh, st), p, (oh, ot)))
        assert triples[b] == brute


def test_gplinker_learns_a_triple():
    # A few steps of Adam on one sample make the gold triple the decoded one.
    torch.manual_seed(5)
    model = GPLinker(6, predicates=2, head_size=8)
    x = torch.randn(1, 9, 6)
    ent_labels = torch.tensor([[0, 0, 1, 2], [0, 1, 5, 6]])
    head_labels = torch.tensor([[0, 1, 1, 5]])
    tail_labels = torch.tensor([[0, 1, 2, 6]])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        model.loss(x, ent_labels, head_labels, tail_labels).backward()
        opt.step()
    assert model.decode(x) == [{((1, 2), 1, (5, 6))}]


# ---------------------------------------------------------------------------------------------
# bert4torch itself, when installed.


def _load_bert4torch_layers():
    """bert4torch.layers.global_point loaded without importing the bert4torch package."""
    spec = importlib.util.find_spec("bert4torch")
    if spec is None or spec.origin is None:
        pytest.skip("bert4torch is not installed (optional peer)")
    root = os.path.dirname(spec.origin)
    saved = {
        k: sys.modules.get(k)
        for k in (
            "bert4torch",
            "bert4torch.snippets",
            "bert4torch.layers",
            "bert4torch.layers.position_encoding",
            "bert4torch.layers.global_point",
        )
    }
    try:
        pkg = types.ModuleType("bert4torch")
        pkg.__path__ = [root]
        snippets = types.ModuleType("bert4torch.snippets")
        snippets.create_registrar = lambda target: lambda *a, **k: lambda cls: cls
        layers = types.ModuleType("bert4torch.layers")
        layers.__path__ = [os.path.join(root, "layers")]
        sys.modules.update({"bert4torch": pkg, "bert4torch.snippets": snippets, "bert4torch.layers": layers})
        mods = {}
        for name in ("position_encoding", "global_point"):
            full = f"bert4torch.layers.{name}"
            s = importlib.util.spec_from_file_location(full, os.path.join(root, "layers", f"{name}.py"))
            mod = importlib.util.module_from_spec(s)
            sys.modules[full] = mod
            s.loader.exec_module(mod)
            mods[name] = mod
        return mods["global_point"]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.parametrize("name", ["EfficientGlobalPointer", "GlobalPointer"])
def test_against_installed_bert4torch(name):
    b4t = _load_bert4torch_layers()
    torch.manual_seed(6)
    theirs = getattr(b4t, name)(10, 3, 8).double()
    ours = getattr(kexue.nn, name)(10, 3, 8).double()
    ours.load_bert4torch(theirs)
    x, mask = inputs()
    with torch.no_grad():
        # bert4torch computes its RoPE angles in float32: agreement to ~1e-6, not 1e-12
        assert same_scores(ours(x, mask), theirs(x, mask)) < 1e-5


@pytest.mark.slow
def test_end_to_end_example_fits():
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = runpy.run_path(os.path.join(root, "examples", "global_pointer_ner.py"))
    assert example["main"](["--steps", "120"]) > 0.95
