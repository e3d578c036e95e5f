"""kexue.init depth scaling (bert_ with n_layers, scale_residual_): only the residual projections are
scaled, names match whole components, and a name that matches nothing is an error.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kexue
from kexue.init import RESIDUAL_NAMES, bert_, scale_residual_
from tests.init.helpers import assert_normal_stats, gen, poisoned_toy


def test_depth_scaling_hits_the_residual_projections_only():
    layers = 3
    plain = bert_(poisoned_toy(layers=layers), generator=gen(16))
    scaled = bert_(poisoned_toy(layers=layers), n_layers=layers, generator=gen(16))
    factor = 1 / math.sqrt(2 * layers)
    sp, ss = plain.state_dict(), scaled.state_dict()
    residual = {f"blocks.{i}.{n}.weight" for i in range(layers) for n in ("o_proj", "down_proj")}
    for key in sp:
        if key in residual:
            assert torch.equal(ss[key], sp[key] * factor), key
        else:
            assert torch.equal(ss[key], sp[key]), key
    w = torch.cat([scaled.state_dict()[k].flatten() for k in residual])
    assert_normal_stats(w, 0.0, 0.02 * factor, "depth-scaled projections")


def test_scale_residual_alone_and_names():
    model = bert_(poisoned_toy(layers=2), generator=gen(17))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert scale_residual_(model, 8, names=("o_proj",)) is model
    after = model.state_dict()
    for key in before:
        expected = before[key] / 4 if key.endswith("o_proj.weight") else before[key]  # sqrt(2 * 8) = 4
        assert torch.equal(after[key], expected), key


def test_scale_residual_matches_whole_name_components():
    # BERT's layout: attention.output.dense and output.dense are residual, intermediate.dense is not
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.output = nn.Module()
    layer.attention.output.dense = nn.Linear(8, 8)
    layer.intermediate = nn.Module()
    layer.intermediate.dense = nn.Linear(8, 16)
    layer.output = nn.Module()
    layer.output.dense = nn.Linear(16, 8)
    layer.self_output = nn.Module()
    layer.self_output.dense = nn.Linear(8, 8)  # "self_output.dense" ends in the text "output.dense", not its components
    layer.info_proj = nn.Linear(8, 8)  # nor is "info_proj" an "o_proj"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    scale_residual_(layer, 2)
    after = layer.state_dict()
    for key in before:
        residual = key in ("attention.output.dense.weight", "output.dense.weight")
        assert torch.equal(after[key], before[key] / 2 if residual else before[key]), key


def test_depth_scaling_no_match_is_an_error_and_changes_nothing():
    model = poisoned_toy()
    with pytest.raises(ValueError, match="residual names"):
        bert_(model, n_layers=3, residual_names=("c_attn",))
    assert all(bool((p == 7.0).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="residual names"):
        scale_residual_(nn.Linear(3, 3), 2)


def test_residual_names_cover_kexue_logn_attention():
    attn = kexue.nn.LogNAttention(32, 4)
    w = attn.out_proj.weight.detach().clone()
    scale_residual_(attn, 2)
    assert torch.equal(attn.out_proj.weight, w / 2)
    assert "out_proj" in RESIDUAL_NAMES
