"""kexue.patch on real transformers models built from tiny configs: the patched attention equals the
models' own (plain scale), an independent log-n oracle with padding, KV-cache decoding, generate,
training steps and torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the optional extra; make test installs it
from transformers import masking_utils  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

import kexue  # noqa: E402
from kexue.integrations import transformers as hf  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.logn_attention.transformers_helpers import DECODERS, TRAIN_LEN, _valid_rows, build, inputs, run  # noqa: E402

FAMILIES = ("bert", "roberta", "llama", "qwen2", "mistral")


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
