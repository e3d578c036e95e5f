"""Hugging Face transformers: put kexue's log-n attention into a built model.

``patch(model, train_len=...)`` registers kexue's attention under the name :data:`IMPLEMENTATION`
in transformers' own registries (``AttentionInterface`` for the attention call,
``AttentionMaskInterface`` for the mask the model builds once per forward) and switches the model
to it with ``model.set_attn_implementation``; ``unpatch(model)`` switches back. Nothing in the
model's weights or code is replaced, so ``state_dict`` and ``save_pretrained`` are untouched.

The mask transformers builds for kexue is the ``(batch, k_len)`` keep-mask of the 2-D
``attention_mask`` the user passed (or ``None``): log-n attention takes causality as a flag and
padding as a key mask, and works out each query's visible-key count ``n`` from them. Patterns it
cannot express (a sliding window shorter than the sequence, packed sequences, chunked or custom
masks, static caches) are refused with a ``ValueError`` at the first forward, never approximated.

transformers is an optional dependency: this module imports it, ``kexue`` itself does not.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import masking_utils
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel
except ImportError as error:  # pragma: no cover - exercised only without the optional extra
    raise ImportError(
        "kexue.patch needs Hugging Face transformers: pip install 'kexue[transformers]' (or pip install transformers)"
    ) from error

from kexue.ops.logn_attention import logn_attention

IMPLEMENTATION = "kexue_logn"
"""The name kexue's attention is registered under in transformers' registries."""

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "llama", "qwen2", "mistral")
"""``config.model_type`` values ``patch`` accepts (models whose attention goes through the registry)."""

ATTENTIONS = ("logn",)

_SETTINGS_ATTR = "kexue_attention"
_PATCH_ATTR = "_kexue_patch"


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """The log-n scale rule one patched attention module uses (see :func:`kexue.ops.logn_attention`)."""

    train_len: float
    logn: bool = True
    clip: bool = False
    min_n: float = 1
    scale: float | str | None = None
    ignore_dropout: bool = False


_DEFAULTS: AttentionSettings | None = None  # set by register(train_len=...)


def _validated(train_len, logn, clip, min_n, scale, ignore_dropout) -> AttentionSettings:
    """The settings, checked once here with the op's own argument checks rather than at the first forward."""
    if not isinstance(ignore_dropout, bool):
        raise TypeError(f"ignore_dropout must be a bool, got {type(ignore_dropout).__name__}")
    probe = torch.zeros(1, 1, 1, 1)
    logn_attention(probe, probe, probe, scale=scale, train_len=train_len, logn=logn, clip=clip, min_n=min_n)
    return AttentionSettings(
        train_len=train_len, logn=logn, clip=clip, min_n=min_n, scale=scale, ignore_dropout=ignore_dropout
    )


@dataclasses.dataclass(frozen=True)
class Patch:
    """What :func:`patch` replaced: the attention implementation the model had, and where."""

    attention: str
    implementation: str
    replaced: str
    modules: tuple[str, ...]
    settings: AttentionSettings


# --------------------------------------------------------------------------------------------
# The two functions registered with transformers.


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
    settings: AttentionSettings | None = getattr(module, _SETTINGS_ATTR, None) or _DEFAULTS
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
    )
    return out.transpose(1, 2).contiguous(), None


def _register_functions() -> None:
    AttentionInterface.register(IMPLEMENTATION, kexue_attention)
    masking_utils.AttentionMaskInterface.register(IMPLEMENTATION, kexue_mask)


def register(
    *,
    train_len: float | None = None,
    logn: bool = True,
    clip: bool = False,
    min_n: float = 1,
    scale: float | str | None = None,
    ignore_dropout: bool = False,
) -> str:
    """Register kexue's attention and mask functions with transformers; returns their name.

    With ``train_len``, the settings become the defaults of every attention module that
    :func:`patch` did not prepare, so that a model built with the name uses kexue from the start::

        name = register(train_len=512)
        model = transformers.AutoModel.from_config(config, attn_implementation=name)

    Without it only the functions are registered (idempotent) and the defaults stay as they were.
    """
    global _DEFAULTS
    if train_len is not None:
        _DEFAULTS = _validated(train_len, logn, clip, min_n, scale, ignore_dropout)
    _register_functions()
    return IMPLEMENTATION


# --------------------------------------------------------------------------------------------
# patch / unpatch.


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules that call the attention registry (they carry ``is_causal`` and ``scaling``)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "is_causal") and hasattr(m, "scaling") and hasattr(m, "config")
    ]


def patch(
    model: nn.Module,
    attention: str = "logn",
    *,
    train_len: float,
    logn: bool = True,
    clip: bool = False,
    min_n: float = 1,
    scale: float | str | None = None,
    ignore_dropout: bool = False,
) -> Patch:
    """Run a built transformers model's attention through :func:`kexue.ops.logn_attention`.

    Args:
        model: a ``PreTrainedModel`` of a supported family (:data:`SUPPORTED_MODEL_TYPES`).
        attention: ``"logn"``, the only kind today.
        train_len: the training length ``m`` of the scale factor ``log_m n``. For a model trained
            without log-n, pass its training length with ``clip=True``: up to ``train_len`` keys the
            attention is then exactly the model's own.
        logn, clip, min_n, scale: as :func:`kexue.ops.logn_attention`; ``scale=None`` keeps the
            model's own scaling (``1/sqrt(head_dim)`` for the supported families).
        ignore_dropout: run without attention dropout even when the module asks for it in training.

    Returns:
        a :class:`Patch` naming the implementation replaced and the attention modules patched.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"kexue.patch supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"{type(model).__name__} has model_type={model_type!r}"
        )
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise ValueError("this model is already patched by kexue; call kexue.unpatch(model) first")
    settings = _validated(train_len, logn, clip, min_n, scale, ignore_dropout)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"found no attention module in {type(model).__name__} that calls transformers' attention registry"
        )
    _register_functions()
    replaced = model.config._attn_implementation
    for _, module in modules:
        setattr(module, _SETTINGS_ATTR, settings)
    model.set_attn_implementation(IMPLEMENTATION)
    record = Patch(
        attention=attention,
        implementation=IMPLEMENTATION,
        replaced=replaced,
        modules=tuple(name for name, _ in modules),
        settings=settings,
    )
    setattr(model, _PATCH_ATTR, record)
    return record


def unpatch(model: nn.Module) -> Patch:
    """Undo :func:`patch`: the model gets back the attention implementation it had. Returns the record."""
    record: Patch | None = getattr(model, _PATCH_ATTR, None)
    if record is None:
        raise ValueError("this model is not patched by kexue")
    model.set_attn_implementation(record.replaced)
    for _, module in _attention_modules(model):
        if hasattr(module, _SETTINGS_ATTR):
            delattr(module, _SETTINGS_ATTR)
    delattr(model, _PATCH_ATTR)
    return record


__all__ = [
    "IMPLEMENTATION",
    "SUPPORTED_MODEL_TYPES",
    "AttentionSettings",
    "Patch",
    "kexue_attention",
    "kexue_mask",
    "patch",
    "register",
    "unpatch",
    "transformers",
]
