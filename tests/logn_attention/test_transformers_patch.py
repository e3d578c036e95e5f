"""kexue.patch / kexue.unpatch on real transformers models built from tiny configs (no downloads).

The oracle for the log-n scale is independent of kexue's kernels and of its mask translation:
transformers' own SDPA mask (``sdpa_mask``) gives each query's visible keys, the query is multiplied
by ``log_m n_i`` and ``scaled_dot_product_attention`` does the rest.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the optional extra; make test installs it

from transformers import masking_utils  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

import kexue  # noqa: E402
from kexue.integrations import _hf_attention as hf_attention  # noqa: E402
from kexue.integrations import transformers as hf  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

VOCAB = 97
TRAIN_LEN = 8  # short, so that the test sequences (up to 23 tokens) go past it


def build(family: str, **overrides):
    """A tiny randomly initialised model of ``family``; ``overrides`` win over the defaults here."""
    torch.manual_seed(0)
    # initializer_range 0.2, not the usual 0.02: attention logits must be large enough that the scale
    # rule visibly changes the output.
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation="sdpa",
        initializer_range=0.2,
    )
    if family in ("bert", "roberta"):
        settings.update(max_position_embeddings=70, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    else:
        settings.update(num_key_value_heads=2, max_position_embeddings=64)
    settings.update(overrides)
    config_cls, model_cls = {
        "bert": (transformers.BertConfig, transformers.BertModel),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    return model_cls(config_cls(**settings))


FAMILIES = ("bert", "roberta", "llama", "qwen2", "mistral")
DECODERS = ("llama", "qwen2", "mistral")


def inputs(family: str, batch: int = 3, length: int = 23):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    keep = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        if family in DECODERS:
            keep[1, :6] = 0  # left padding, as for generation
        else:
            keep[1, -6:] = 0  # right padding
    return ids, keep


def run(model, ids, keep):
    out = model(input_ids=ids, attention_mask=keep)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _valid_rows(x, keep):
    return x[keep.bool()]


# --------------------------------------------------------------------------------------------
# An independent log-n attention for transformers, built on its own SDPA mask.


def _oracle_attention(train_len, clip=False):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        lq, lk = query.shape[2], key.shape[2]
        if attention_mask is None:
            allowed = torch.ones(lq, lk, dtype=torch.bool)
            if module.is_causal:
                allowed = allowed.tril(lk - lq)
            allowed = allowed.expand(query.shape[0], 1, lq, lk)
        else:
            allowed = attention_mask
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(query.dtype)  # (B, 1, Lq, 1)
        factor = n.log() / math.log(train_len)
        if clip:
            factor = factor.clamp(min=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query * factor, key, value, attn_mask=allowed, scale=scaling
        )
        out = torch.where(allowed.any(-1, keepdim=True), out, 0)  # kexue's convention for rows with no key
        return out.transpose(1, 2).contiguous(), None

    return attention


def with_oracle(model, train_len, clip=False):
    name = f"test_logn_oracle_{train_len}_{clip}"
    AttentionInterface.register(name, _oracle_attention(train_len, clip))
    masking_utils.AttentionMaskInterface.register(name, masking_utils.sdpa_mask)
    model.set_attn_implementation(name)
    return model


# --------------------------------------------------------------------------------------------
# Equality with the models' own attention.


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_scale_matches_sdpa_forward_and_backward(family):
    model = build(family).eval()
    ids, keep = inputs(family)
    ref = run(model, ids, keep)
    params = list(model.parameters())
    # A random projection of the output as the loss (a sum of squares of LayerNorm outputs would be
    # nearly constant, its gradients rounding noise).
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(_valid_rows(ref * weight, keep).sum(), params, allow_unused=True)
    record = kexue.patch(model, train_len=TRAIN_LEN, logn=False)
    assert record.replaced == "sdpa" and record.implementation == hf.IMPLEMENTATION
    assert len(record.modules) == 2 and model.config._attn_implementation == hf.IMPLEMENTATION
    out = run(model, ids, keep)
    torch.testing.assert_close(_valid_rows(out, keep), _valid_rows(ref, keep), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(_valid_rows(out * weight, keep).sum(), params, allow_unused=True)
    assert [g is None for g in grads] == [r is None for r in ref_grads]  # e.g. BERT's pooler takes no part
    # One relative error over all gradients together: some are zero in exact arithmetic (the key bias
    # shifts every logit of a row alike), so theirs alone would compare rounding noise.
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    ref_flat = torch.cat([r.flatten() for r in ref_grads if r is not None])
    assert rel_err(flat, ref_flat) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_clipped_logn_is_the_model_itself_up_to_train_len(family):
    model = build(family).eval()
    ids, keep = inputs(family, length=16)
    keep = torch.ones_like(keep)
    ref = run(model, ids, keep)
    kexue.patch(model, train_len=16, clip=True)  # every query sees <= 16 keys: factor max(1, .) = 1
    torch.testing.assert_close(run(model, ids, keep), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("clip", [False, True])
def test_logn_matches_an_independent_oracle_with_padding(family, clip):
    model = build(family).eval()
    ids, keep = inputs(family)
    expected = run(with_oracle(model, TRAIN_LEN, clip), ids, keep)
    model.set_attn_implementation("sdpa")
    kexue.patch(model, train_len=TRAIN_LEN, clip=clip)
    out = run(model, ids, keep)
    torch.testing.assert_close(_valid_rows(out, keep), _valid_rows(expected, keep), rtol=1e-5, atol=1e-5)
    plain = run(build(family).eval(), ids, keep)
    assert rel_err(_valid_rows(out, keep), _valid_rows(plain, keep)) > 1e-3, "log-n past train_len must matter"


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_decoding_counts_absolute_positions(family):
    # Log-n makes the scale depend on how many keys a query sees, so decoding token by token with a
    # cache must give the logits of the full forward: the cache's keys count.
    model = build(family).eval()
    kexue.patch(model, train_len=TRAIN_LEN)
    ids, keep = inputs(family, length=20)
    full = model(input_ids=ids, attention_mask=keep).logits
    out = model(input_ids=ids[:, :12], attention_mask=keep[:, :12], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(12, 20):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=keep[:, : t + 1], cache=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(_valid_rows(torch.cat(steps, 1), keep), _valid_rows(full, keep), rtol=1e-4, atol=1e-5)


def test_generate_with_plain_scale_matches_sdpa():
    model = build("llama").eval()
    ids, keep = inputs("llama", batch=2, length=9)
    expected = model.generate(input_ids=ids, attention_mask=keep, max_new_tokens=6, do_sample=False)
    kexue.patch(model, train_len=TRAIN_LEN, logn=False)
    got = model.generate(input_ids=ids, attention_mask=keep, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_training_step_through_patched_model_moves_the_loss():
    model = build("llama")
    kexue.patch(model, train_len=TRAIN_LEN)
    ids, _ = inputs("llama", batch=4, length=16)
    opt = kexue.optim.Tiger(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# --------------------------------------------------------------------------------------------
# unpatch, records, state.


def test_unpatch_restores_the_previous_implementation():
    model = build("qwen2").eval()
    ids, keep = inputs("qwen2")
    ref = run(model, ids, keep)
    keys = list(model.state_dict())
    kexue.patch(model, train_len=TRAIN_LEN)
    assert not torch.allclose(run(model, ids, keep), ref)
    assert list(model.state_dict()) == keys, "patch must not add or remove parameters or buffers"
    record = kexue.unpatch(model)
    assert record.replaced == "sdpa" and model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "kexue_attention") for m in model.modules())
    torch.testing.assert_close(run(model, ids, keep), ref)
    with pytest.raises(ValueError, match="not patched"):
        kexue.unpatch(model)


def test_eager_model_is_restored_to_eager():
    model = build("bert", attn_implementation="eager").eval()
    assert kexue.patch(model, train_len=TRAIN_LEN).replaced == "eager"
    kexue.unpatch(model)
    assert model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------------------------
# Refusals: clear errors, never a silently different attention.


def test_unknown_architecture_lists_the_supported_ones():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    with pytest.raises(ValueError, match="bert, roberta, llama, qwen2, mistral"):
        kexue.patch(transformers.GPT2Model(cfg), train_len=TRAIN_LEN)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (dict(attention="flash", train_len=8), ValueError, "attention must be one of"),
        (dict(train_len=1.0), ValueError, "train_len"),
        (dict(train_len=8, min_n=-1), ValueError, "min_n"),
        (dict(train_len=8, scale="big"), ValueError, "scale"),
        (dict(train_len=8, ignore_dropout=1), TypeError, "ignore_dropout"),
    ],
)
def test_bad_arguments(bad, exc, match):
    model = build("llama")
    with pytest.raises(exc, match=match):
        kexue.patch(model, **bad)
    assert model.config._attn_implementation == "sdpa", "a refused patch must leave the model as it was"


def test_not_a_model_and_double_patch():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        kexue.patch(torch.nn.Linear(2, 2), train_len=TRAIN_LEN)
    model = build("llama")
    kexue.patch(model, train_len=TRAIN_LEN)
    with pytest.raises(ValueError, match="already patched"):
        kexue.patch(model, train_len=TRAIN_LEN)


def test_attention_dropout_in_training_is_refused_unless_ignored():
    model = build("bert", attention_probs_dropout_prob=0.1).train()
    ids, keep = inputs("bert")
    kexue.patch(model, train_len=TRAIN_LEN)
    with pytest.raises(ValueError, match="dropout"):
        run(model, ids, keep)
    model.eval()
    run(model, ids, keep)  # no dropout asked for in eval mode
    kexue.unpatch(model)
    kexue.patch(model.train(), train_len=TRAIN_LEN, ignore_dropout=True)
    assert torch.isfinite(run(model, ids, keep)).all()


def test_sliding_window_shorter_than_the_sequence_is_refused():
    model = build("mistral", sliding_window=10).eval()
    kexue.patch(model, train_len=TRAIN_LEN)
    ids, keep = inputs("mistral", length=10)
    assert torch.isfinite(run(model, ids, keep)).all()  # a window as long as the sequence is plain causal
    ids, keep = inputs("mistral", length=16)
    with pytest.raises(ValueError, match="sliding"):
        run(model, ids, keep)


def test_packed_sequences_in_one_row_are_refused():
    model = build("llama").eval()
    kexue.patch(model, train_len=TRAIN_LEN)
    ids, _ = inputs("llama", batch=1, length=12)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=ids, position_ids=position_ids, use_cache=False)  # with a cache transformers ignores packing


def test_a_4d_mask_is_refused():
    model = build("llama").eval()
    kexue.patch(model, train_len=TRAIN_LEN)
    ids, _ = inputs("llama", batch=1, length=6)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=mask)


def test_static_and_paged_caches_are_refused():
    model = build("llama").eval()
    kexue.patch(model, train_len=TRAIN_LEN)
    attn = next(m for _, m in hf._attention_modules(model))
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="paged caches"):  # continuous batching's call
        hf.kexue_attention(attn, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]), cu_seq_lens_k=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="static"):  # a StaticCache's tensor offsets reach the mask builder
        hf.kexue_mask(1, 3, 8, q_offset=torch.tensor(5), kv_offset=0)


@pytest.fixture
def no_defaults(monkeypatch):
    monkeypatch.setattr(hf_attention, "_DEFAULTS", None)  # restored after the test


def test_naming_the_implementation_without_patch_explains_what_to_do(no_defaults):
    hf.register()
    model = build("llama")
    model.set_attn_implementation(hf.IMPLEMENTATION)
    ids, _ = inputs("llama", batch=1, length=4)
    with pytest.raises(ValueError, match=r"kexue.patch\(model, train_len"):
        model(input_ids=ids)


@pytest.mark.slow
def test_torch_compile_of_a_patched_model():
    model = build("llama").eval()
    kexue.patch(model, train_len=TRAIN_LEN)
    ids, keep = inputs("llama")
    expected = run(model, ids, keep)
    compiled = run(torch.compile(model), ids, keep)
    torch.testing.assert_close(_valid_rows(compiled, keep), _valid_rows(expected, keep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_plain_scale_matches_the_models_eager_attention(family):
    model = build(family, attn_implementation="eager").eval()
    ids, keep = inputs(family)
    expected = run(model, ids, keep)
    kexue.patch(model, train_len=TRAIN_LEN, logn=False)
    torch.testing.assert_close(
        _valid_rows(run(model, ids, keep), keep), _valid_rows(expected, keep), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_model_built_with_the_registered_name(family, no_defaults):
    # register(train_len=...) lets from_config / the constructor use kexue directly; the result is
    # the patched model's.
    name = hf.register(train_len=TRAIN_LEN)
    built = build(family, attn_implementation=name).eval()
    assert built.config._attn_implementation == name
    auto = transformers.AutoModel.from_config(built.config, attn_implementation=name)
    assert auto.config._attn_implementation == name
    patched = build(family).eval()
    kexue.patch(patched, train_len=TRAIN_LEN)
    ids, keep = inputs(family)
    torch.testing.assert_close(_valid_rows(run(built, ids, keep), keep), _valid_rows(run(patched, ids, keep), keep))
    with pytest.raises(ValueError, match="train_len"):
        hf.register(train_len=0.5)
