"""kexue.patch / kexue.unpatch / kexue.register lifecycle and refusals: unpatch restores the previous
implementation, a model built with the registered name equals the patched one, and unsupported
models, arguments, masks, caches and dropout get clear errors, never a silently different attention.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the optional extra; make test installs it
import kexue  # noqa: E402
from kexue.integrations import _hf_attention as hf_attention  # noqa: E402
from kexue.integrations import transformers as hf  # noqa: E402
from tests.logn_attention.transformers_helpers import TRAIN_LEN, VOCAB, _valid_rows, build, inputs, run  # noqa: E402


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
        (dict(train_len=8, allow_tf32="yes"), TypeError, "allow_tf32"),
    ],
)
def test_bad_arguments(bad, exc, match):
    model = build("llama")
    with pytest.raises(exc, match=match):
        kexue.patch(model, **bad)
    assert model.config._attn_implementation == "sdpa", "a refused patch must leave the model as it was"


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_allow_tf32_reaches_the_op(monkeypatch, allow_tf32):
    """The patch's allow_tf32 is what every attention call passes on (the CPU backend then computes
    in full float32, so the output is the same either way)."""
    seen = []
    op = hf_attention.logn_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["allow_tf32"])
        return op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "logn_attention", spy)
    model = build("llama").eval()
    ids, keep = inputs("llama")
    record = kexue.patch(model, train_len=TRAIN_LEN, allow_tf32=allow_tf32)
    assert record.settings.allow_tf32 is allow_tf32
    out = run(model, ids, keep)
    assert seen and set(seen) == {allow_tf32}
    kexue.unpatch(model)
    kexue.patch(model, train_len=TRAIN_LEN)
    torch.testing.assert_close(run(model, ids, keep), out, rtol=0, atol=0)


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
