"""The two functions kexue registers with transformers: the mask builder and the attention call.

Each patched attention module carries its :class:`AttentionSettings`; modules built with the
registered name but never patched use the defaults that ``register(train_len=...)`` set here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from transformers import masking_utils

from kexue.ops.logn_attention import logn_attention

IMPLEMENTATION = "kexue_logn"
"""The name kexue's attention is registered under in transformers' registries."""

SETTINGS_ATTR = "kexue_attention"  # the attribute of a patched attention module holding its settings


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """The log-n scale rule one patched attention module uses (see :func:`kexue.ops.logn_attention`)."""

    train_len: float
    logn: bool = True
    clip: bool = False
    min_n: float = 1
    scale: float | str | None = None
    ignore_dropout: bool = False
    allow_tf32: bool = False


_DEFAULTS: AttentionSettings | None = None  # set by set_defaults (register(train_len=...))


def set_defaults(settings: AttentionSettings) -> None:
    """The settings of attention modules that ``patch`` did not prepare."""
    global _DEFAULTS
    _DEFAULTS = settings


def _check_pattern(q_length, kv_length, q_offset, kv_offset, mask_function, device, use_vmap) -> None:
    """Refuse a mask pattern other than full or causal attention.

    The two plain patterns are recognised by identity (no work); anything else (sliding windows,
    packed sequences, custom ``and``/``or`` masks) is expanded once, without padding, and
    compared with the two patterns, so a sliding window longer than the sequence is accepted.
    """
    if isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor):
        raise ValueError("kexue attention does not support static (pre-allocated) caches: use the default DynamicCache")
    if mask_function is masking_utils.bidirectional_mask_function:
        return
    if q_offset + q_length != kv_offset + kv_length:
        # kexue aligns a causal query with the last keys (a KV cache comes first); transformers' causal
        # pattern is the same only when the queries end where the keys end.
        raise ValueError(
            f"kexue attention needs the queries to end where the keys end, got q_offset={q_offset}, "
            f"q_length={q_length}, kv_offset={kv_offset}, kv_length={kv_length}"
        )
    if mask_function is masking_utils.causal_mask_function:
        return
    built = masking_utils.sdpa_mask(
        batch_size=1,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=None,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device=device,
    )
    if built is None:
        return
    q_pos = torch.arange(q_length, device=device)[:, None] + q_offset
    k_pos = torch.arange(kv_length, device=device)[None, :] + kv_offset
    causal = (k_pos <= q_pos).expand_as(built)
    if not (torch.equal(built, causal) or bool(built.all())):
        raise ValueError(
            "this model asked for an attention pattern kexue's log-n attention cannot express "
            "(a sliding window shorter than the sequence, packed sequences in one row, or a custom "
            "mask); it supports full or causal attention with key padding"
        )


def kexue_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=masking_utils.causal_mask_function,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
) -> Tensor | None:
    """The mask transformers builds for kexue: the ``(batch, kv_length)`` bool keep-mask, or ``None``.

    Called by ``create_causal_mask`` / ``create_bidirectional_mask`` with the 2-D padding mask the
    user passed (True keeps a token). Causality travels in ``module.is_causal`` instead.
    """
    _check_pattern(q_length, kv_length, q_offset, kv_offset, mask_function, device, use_vmap)
    if attention_mask is None:
        return None
    keep = attention_mask[:, -kv_length:].to(dtype=torch.bool)
    if keep.shape != (batch_size, kv_length):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the {kv_length} keys "
            f"of a batch of {batch_size}"
        )
    return keep


def kexue_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention call: query ``(B, Hq, Lq, D)``, key/value ``(B, Hkv, Lk, D)``.

    Returns ``(out (B, Lq, Hq, D), None)``: attention weights are never formed.
    """
    settings: AttentionSettings | None = getattr(module, SETTINGS_ATTR, None) or _DEFAULTS
    if settings is None:
        raise ValueError(
            f"{type(module).__name__} runs with attn_implementation={IMPLEMENTATION!r} but was not "
            "prepared by kexue.patch(model, train_len=...), and no defaults were registered: call "
            "kexue.patch, or kexue.integrations.transformers.register(train_len=...) before building"
        )
    if dropout and not settings.ignore_dropout:
        raise ValueError(
            f"kexue attention has no attention-probability dropout, and this module asks for "
            f"{dropout}: set the config's attention dropout to 0, call model.eval(), or patch with "
            "ignore_dropout=True"
        )
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(
            f"sliding_window={window} is shorter than the {key.shape[2]} keys; kexue attention has no sliding window"
        )
    paged = [
        name
        for name in ("cu_seq_lens_q", "cu_seq_lens_k", "block_table", "block_tables")
        if kwargs.get(name) is not None
    ]
    if paged:  # continuous batching hands over a paged cache (and packed rows): kexue reads contiguous k / v
        raise ValueError(
            f"kexue attention does not support paged caches (called with {', '.join(paged)}): use "
            "the default DynamicCache"
        )
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"kexue attention does not support {name}")
    if kwargs.get("output_attentions"):
        raise ValueError("kexue attention never forms attention weights: call with output_attentions=False")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"kexue attention takes a 2-D padding mask (batch, k_len); got a {attention_mask.dim()}-d "
            "mask, which it cannot express (pass the 2-D attention_mask to the model instead)"
        )
    causal = getattr(module, "is_causal", False) if is_causal is None else bool(is_causal)
    padding = None if attention_mask is None else ~attention_mask
    scale = settings.scale if settings.scale is not None else scaling
    out = logn_attention(
        query,
        key,
        value,
        causal=causal,
        scale=scale,
        train_len=settings.train_len,
        logn=settings.logn,
        clip=settings.clip,
        min_n=settings.min_n,
        key_padding_mask=padding,
        allow_tf32=settings.allow_tf32,
    )
    return out.transpose(1, 2).contiguous(), None
