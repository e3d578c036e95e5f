"""kexue.init.bert_: BERT initialization of every kind of module, its std, generator, low precision,
the package export, and clear errors for bad arguments of bert_ and scale_residual_.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kexue
from kexue.init import TF_TRUNCATED_STD_RATIO, bert_, scale_residual_
from tests.init.helpers import SPEC_RATIO, assert_normal_stats, gen, poisoned_toy


@pytest.mark.parametrize("truncated", [False, True])
def test_bert_init_every_kind_of_module(truncated):
    model = poisoned_toy()
    assert bert_(model, truncated=truncated, generator=gen(7)) is model
    realised = 0.02 * (SPEC_RATIO if truncated else 1.0)
    drawn = {"embed.weight": model.embed.weight, "pos": model.pos}
    for i, block in enumerate(model.blocks):
        for name in ("q_proj", "o_proj", "up_proj", "down_proj"):
            drawn[f"blocks.{i}.{name}.weight"] = getattr(block, name).weight
    for name, w in drawn.items():
        rows = w[torch.arange(w.shape[0]) != 1] if name == "embed.weight" else w
        assert_normal_stats(rows, 0.0, realised, name)
        if truncated:
            assert float(w.detach().abs().max()) <= 0.04, name
        else:
            assert float(w.detach().abs().max()) > 0.04, name  # a plain normal of >= 8k draws exceeds 2 std
    # the padding row is zero, also through the tied head initialized after it
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight[1], torch.zeros(128))
    for block in model.blocks:
        for lin in (block.q_proj, block.o_proj, block.up_proj, block.down_proj):
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert torch.equal(block.norm1.weight, torch.ones(128)) and torch.equal(block.norm1.bias, torch.zeros(128))
        assert torch.equal(block.norm2.weight, torch.ones(128))
    assert torch.equal(model.final_norm.weight, torch.ones(128))
    assert torch.equal(model.extra_bias, torch.zeros(128))
    assert torch.equal(model.temperature, torch.full((1,), 7.0))


def test_bert_exact_std_truncated():
    model = poisoned_toy()
    bert_(model, truncated=True, exact_std=True, generator=gen(8))
    w = torch.cat([b.up_proj.weight.detach().flatten() for b in model.blocks])
    assert_normal_stats(w, 0.0, 0.02, "truncated exact_std")
    assert float(w.abs().max()) <= 2 * 0.02 / TF_TRUNCATED_STD_RATIO * (1 + 1e-6)


def test_bert_custom_std():
    model = bert_(nn.Linear(256, 512), std=0.05, generator=gen(9))
    assert_normal_stats(model.weight, 0.0, 0.05, "std 0.05")


def test_bert_reproducible_with_generator():
    a, b, c = (bert_(poisoned_toy(), generator=gen(s)) for s in (10, 10, 11))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.q_proj.weight"], sc["blocks.0.q_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bert_low_precision_model(dtype):
    model = bert_(nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256)).to(dtype), generator=gen(12))
    assert model[0].weight.dtype == dtype
    assert_normal_stats(model[0].weight, 0.0, 0.02, f"{dtype}", slack=torch.finfo(dtype).eps)
    assert torch.equal(model[1].weight, torch.ones(256, dtype=dtype))


def test_bert_torch_transformer_layer():
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    bert_(layer, generator=gen(13))
    attn = layer.self_attn
    assert_normal_stats(attn.in_proj_weight, 0.0, 0.02, "in_proj_weight")  # a bare 2-d parameter
    assert torch.equal(attn.in_proj_bias, torch.zeros_like(attn.in_proj_bias))
    assert torch.equal(layer.linear2.bias, torch.zeros(64)) and torch.equal(layer.norm1.weight, torch.ones(64))
    y = layer(torch.randn(2, 5, 64, generator=gen(14)))
    assert torch.isfinite(y).all()


def test_bert_embedding_bag_and_conv():
    model = nn.ModuleDict({"bag": nn.EmbeddingBag(100, 64, padding_idx=0), "conv": nn.Conv1d(32, 64, 5)})
    bert_(model, generator=gen(15))
    assert torch.equal(model["bag"].weight[0], torch.zeros(64))
    assert_normal_stats(model["conv"].weight, 0.0, 0.02, "conv1d")
    assert torch.equal(model["conv"].bias, torch.zeros(64))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: bert_(torch.zeros(3)), TypeError, "nn.Module"),
        (lambda: bert_("model"), TypeError, "nn.Module"),
        (lambda: bert_(nn.Linear(2, 2), std=0), ValueError, "std"),
        (lambda: bert_(nn.Linear(2, 2), std=None), TypeError, "std"),
        (lambda: bert_(nn.Linear(2, 2), generator="seed"), TypeError, "generator"),
        (lambda: bert_(nn.Linear(2, 2), n_layers=0), ValueError, "n_layers"),
        (lambda: bert_(nn.Linear(2, 2), n_layers=2.0), TypeError, "n_layers"),
        (lambda: bert_(nn.Linear(2, 2), n_layers=2, residual_names="o_proj"), TypeError, "names"),
        (lambda: bert_(nn.Linear(2, 2), n_layers=2, residual_names=()), ValueError, "names"),
        (lambda: scale_residual_(torch.zeros(3), 2), TypeError, "nn.Module"),
        (lambda: scale_residual_(nn.Linear(2, 2), True), TypeError, "n_layers"),
        (lambda: scale_residual_(nn.Linear(2, 2), -1), ValueError, "n_layers"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_exported_from_package():
    assert kexue.init.bert_ is bert_ and "init" in kexue.__all__
