"""Tiny transformers models, their inputs and a forward run, shared by the kexue.patch test modules
(import it after their transformers skip).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the optional extra; make test installs it

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
