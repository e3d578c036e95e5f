"""kexue.init: TF truncated normal, BERT initialization of any module, depth scaling.

Statistical bounds. For n i.i.d. draws of a law with std s:
- the sample mean has standard error s / sqrt(n);
- the sample std has standard error ~ s * sqrt((kurtosis - 1) / (4 n)); the normal law has
  kurtosis 3 (SE = s / sqrt(2 n)) and the truncated normal a smaller one (its tails are cut), so
  s / sqrt(2 n) bounds both.
A test allows 6 standard errors (a false failure has probability ~2e-9 per check); the draws use a
fixed generator, so a run is also reproducible. For the shape of the law, the
Dvoretzky-Kiefer-Wolfowitz inequality P(sup_x |F_n(x) - F(x)| > eps) <= 2 exp(-2 n eps^2) gives
eps = sqrt(ln(2 / 1e-9) / (2 n)) at false-failure probability 1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kexue
from kexue.init import RESIDUAL_NAMES, TF_TRUNCATED_STD_RATIO, bert_, scale_residual_, trunc_normal_tf_

SPEC_RATIO = 0.8796257  # docs/init.md: sqrt(gamma), gamma = 0.7737413
SIGMAS = 6.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_normal_stats(x: torch.Tensor, mean: float, std: float, what: str, slack: float = 0.0) -> None:
    """Sample mean and std of ``x`` within 6 standard errors of (mean, std); ``slack`` adds a
    relative allowance on std (rounding of 16-bit storage)."""
    x = x.detach().double().flatten()
    n = x.numel()
    got_mean, got_std = float(x.mean()), float(x.std())
    tol_mean = SIGMAS * std / math.sqrt(n)
    tol_std = SIGMAS * std / math.sqrt(2 * n) + slack * std
    assert abs(got_mean - mean) <= tol_mean, f"{what}: mean {got_mean:.6g}, expected {mean} +- {tol_mean:.3g}"
    assert abs(got_std - std) <= tol_std, f"{what}: std {got_std:.6g}, expected {std:.6g} +- {tol_std:.3g}"


def truncated_cdf(x: torch.Tensor, bound: float = 2.0) -> torch.Tensor:
    """CDF of N(0, 1) conditioned on |x| <= bound."""
    phi = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    lo, hi = phi(torch.tensor(-bound, dtype=torch.float64)), phi(torch.tensor(bound, dtype=torch.float64))
    return ((phi(x) - lo) / (hi - lo)).clamp(0, 1)


# ----------------------------------------------------------------------------- trunc_normal_tf_


def test_truncated_std_ratio_matches_spec_and_quadrature():
    assert abs(TF_TRUNCATED_STD_RATIO - SPEC_RATIO) < 5e-8
    x = torch.linspace(-2, 2, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * x * x)
    gamma = torch.trapezoid(x * x * density, x) / torch.trapezoid(density, x)
    assert abs(TF_TRUNCATED_STD_RATIO - math.sqrt(float(gamma))) < 1e-9


def test_trunc_normal_tf_law():
    std = 0.02
    t = torch.full((1000, 1000), float("nan"))
    out = trunc_normal_tf_(t, std=std, generator=gen())
    assert out is t
    assert torch.isfinite(t).all()
    # the cut is relative: nothing beyond 2 std, and the tail right up to it is populated
    # (the expected count in 1.99..2 std is ~560, so a narrower cut fails)
    assert float(t.abs().max()) <= 2 * std
    assert int((t.abs() > 1.99 * std).sum()) > 100
    # the realised std is 0.0176 for 0.02 (spec), not 0.02
    assert_normal_stats(t, 0.0, std * SPEC_RATIO, "truncated std 0.02")
    assert abs(float(t.double().std()) - 0.0176) < 5e-5
    # the whole law: empirical CDF against the truncated normal CDF (DKW bound, module docstring)
    z = torch.sort(t.flatten().double() / std).values
    n = z.numel()
    grid = torch.linspace(-2, 2, 81, dtype=torch.float64)
    empirical = torch.searchsorted(z, grid, right=True).double() / n
    eps = math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert float((empirical - truncated_cdf(grid)).abs().max()) <= eps


def test_trunc_normal_tf_is_not_torch_default_trunc_normal():
    # the spec's implementer trap: torch's default bounds are absolute (+-2), i.e. no truncation at std 0.02
    a = torch.empty(500, 1000)
    torch.nn.init.trunc_normal_(a, std=0.02, generator=gen())
    b = trunc_normal_tf_(torch.empty(500, 1000), std=0.02, generator=gen())
    assert float(a.abs().max()) > 0.08 and float(b.abs().max()) <= 0.04


def test_trunc_normal_tf_exact_std_and_mean():
    std, mean = 0.02, 1.5
    t = trunc_normal_tf_(
        torch.empty(800, 1000, dtype=torch.float64), std=std, mean=mean, exact_std=True, generator=gen(1)
    )
    assert_normal_stats(t, mean, std, "exact_std")
    assert float((t - mean).abs().max()) <= 2 * std / TF_TRUNCATED_STD_RATIO * (1 + 1e-12)
    assert float((t - mean).abs().max()) > 2 * std  # the cut widened with the draw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_trunc_normal_tf_dtypes(dtype):
    std = 0.5
    t = trunc_normal_tf_(torch.empty(500, 500, dtype=dtype), std=std, generator=gen(2))
    assert t.dtype == dtype
    # rounding to the storage dtype is monotone and 2 * std is 2 * (std in that dtype), exactly
    assert float(t.abs().max()) <= float(2 * torch.tensor(std, dtype=dtype))
    assert_normal_stats(t, 0.0, std * SPEC_RATIO, f"{dtype}", slack=torch.finfo(dtype).eps)


def test_trunc_normal_tf_non_contiguous_and_empty():
    base = torch.zeros(300, 400)
    view = base.t()  # not contiguous: filled in place through the view
    trunc_normal_tf_(view, std=0.1, generator=gen(3))
    assert int((base == 0).sum()) < 10
    assert_normal_stats(base, 0.0, 0.1 * SPEC_RATIO, "transposed view")
    empty = torch.empty(0, 7)
    assert trunc_normal_tf_(empty) is empty


def test_trunc_normal_tf_generator_reproducible_and_leaves_global_rng():
    a = trunc_normal_tf_(torch.empty(64, 64), generator=gen(5))
    state = torch.get_rng_state()
    b = trunc_normal_tf_(torch.empty(64, 64), generator=gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    c = trunc_normal_tf_(torch.empty(64, 64), generator=gen(6))
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"std": 0.0}, ValueError, "std"),
        ({"std": -0.02}, ValueError, "std"),
        ({"std": float("nan")}, ValueError, "std"),
        ({"std": float("inf")}, ValueError, "std"),
        ({"std": "0.02"}, TypeError, "std"),
        ({"std": True}, TypeError, "std"),
        ({"mean": float("nan")}, ValueError, "mean"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_trunc_normal_tf_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        trunc_normal_tf_(torch.empty(3), **kwargs)


def test_generator_on_another_device():
    with pytest.raises(ValueError, match="generator is on device cpu"):
        trunc_normal_tf_(torch.empty(4, device="meta"), generator=gen())
    with pytest.raises(ValueError, match="generator is on device cpu"):
        bert_(nn.Linear(4, 4, device="meta"), generator=gen())


def test_trunc_normal_tf_bad_tensor():
    with pytest.raises(TypeError, match="tensor"):
        trunc_normal_tf_([0.0, 1.0])
    with pytest.raises(TypeError, match="floating"):
        trunc_normal_tf_(torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------- bert_


class CustomRMSNorm(nn.Module):
    """Not a torch norm: recognised by its name, as LlamaRMSNorm and T5LayerNorm are."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.RMSNorm(d)
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class Toy(nn.Module):
    """Embedding with a padding row, tied output head, blocks, a custom norm, bare parameters."""

    def __init__(self, vocab=300, d=128, layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=1)
        self.pos = nn.Parameter(torch.empty(64, d))  # 2-d bare parameter: drawn
        self.extra_bias = nn.Parameter(torch.empty(d))  # named like a bias: zeroed
        self.temperature = nn.Parameter(torch.empty(1))  # neither: left as it is
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.final_norm = CustomRMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: the head comes after the embedding


def poisoned_toy(**kwargs) -> Toy:
    model = Toy(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    return model


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


# ---------------------------------------------------------------------------- depth scaling


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


# ------------------------------------------------------------------------- transformers models


def test_transformers_bert_and_llama():
    transformers = pytest.importorskip("transformers")
    bert_cfg = transformers.BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    llama_cfg = transformers.LlamaConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    for cls, cfg, residual in (
        (transformers.BertForMaskedLM, bert_cfg, ("attention.output.dense", "output.dense")),
        (transformers.LlamaForCausalLM, llama_cfg, ("o_proj", "down_proj")),
    ):
        torch.manual_seed(0)
        plain, scaled = cls(cfg).eval(), cls(cfg).eval()
        # the default of bert_ is the law of Hugging Face's own init: plain N(0, 0.02), not truncated
        hf = torch.cat([m.weight.detach().flatten() for m in plain.modules() if isinstance(m, nn.Linear)])
        assert_normal_stats(hf, 0.0, 0.02, f"{cls.__name__} own init")
        assert float(hf.abs().max()) > 0.04
        for model in (plain, scaled):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(7.0)
        bert_(plain, generator=gen(20))
        bert_(scaled, n_layers=cfg.num_hidden_layers, generator=gen(20))
        ours = torch.cat(
            [
                m.weight.detach().flatten()
                for n, m in plain.named_modules()
                if isinstance(m, nn.Linear) and not any(n.endswith(r) for r in residual)
            ]
        )
        assert_normal_stats(ours, 0.0, 0.02, f"{cls.__name__} bert_")
        assert float(ours.abs().max()) > 0.04
        emb = plain.get_input_embeddings()
        assert torch.equal(emb.weight[0], torch.zeros(64)), cls.__name__  # pad_token_id row
        assert_normal_stats(emb.weight[1:], 0.0, 0.02, f"{cls.__name__} embeddings")
        modules = dict(plain.named_modules())
        for name, m in modules.items():
            if "norm" in type(m).__name__.lower():
                assert torch.equal(m.weight, torch.ones(64)), name
                if getattr(m, "bias", None) is not None:
                    assert torch.equal(m.bias, torch.zeros(64)), name
        for name, p in plain.named_parameters():
            assert not bool((p == 7.0).any()), f"{cls.__name__}.{name} left uninitialized"
            if name.endswith("bias"):
                assert torch.equal(p, torch.zeros_like(p)), name
        factor = 1 / math.sqrt(2 * cfg.num_hidden_layers)
        sp, ss = plain.state_dict(), scaled.state_dict()
        hit = 0
        for key in sp:
            module_name = key.rsplit(".", 1)[0]
            is_residual = (
                key.endswith(".weight")
                and any(module_name.endswith("." + r) for r in residual)
                and "norm" not in key.lower()
            )
            hit += is_residual
            assert torch.equal(ss[key], sp[key] * factor if is_residual else sp[key]), key
        assert hit == 2 * cfg.num_hidden_layers, cls.__name__
        ids = torch.randint(1, 500, (2, 16), generator=gen(21))
        with torch.no_grad():
            logits = scaled(input_ids=ids).logits
        assert torch.isfinite(logits).all() and logits.shape == (2, 16, 500)
