"""kexue.init on real transformers models (BERT and Llama built from tiny configs): BERT statistics and
depth scaling compared with the models' own initialization.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kexue.init import bert_
from tests.init.helpers import assert_normal_stats, gen


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
