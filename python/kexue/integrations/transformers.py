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
from torch import nn

try:
    import transformers
    from transformers import masking_utils
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel
except ImportError as error:  # pragma: no cover - exercised only without the optional extra
    raise ImportError(
        "kexue.patch needs Hugging Face transformers: pip install 'kexue[transformers]' (or pip install transformers)"
    ) from error

from kexue.integrations._hf_attention import (
    IMPLEMENTATION,
    SETTINGS_ATTR,
    AttentionSettings,
    kexue_attention,
    kexue_mask,
    set_defaults,
)
from kexue.ops.logn_attention import logn_attention

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "llama", "qwen2", "mistral")
"""``config.model_type`` values ``patch`` accepts (models whose attention goes through the registry)."""

ATTENTIONS = ("logn",)

_PATCH_ATTR = "_kexue_patch"


def _validated(train_len, logn, clip, min_n, scale, ignore_dropout, allow_tf32) -> AttentionSettings:
    """The settings, checked once here with the op's own argument checks rather than at the first forward."""
    if not isinstance(ignore_dropout, bool):
        raise TypeError(f"ignore_dropout must be a bool, got {type(ignore_dropout).__name__}")
    probe = torch.zeros(1, 1, 1, 1)
    logn_attention(
        probe,
        probe,
        probe,
        scale=scale,
        train_len=train_len,
        logn=logn,
        clip=clip,
        min_n=min_n,
        allow_tf32=allow_tf32,
    )
    return AttentionSettings(
        train_len=train_len,
        logn=logn,
        clip=clip,
        min_n=min_n,
        scale=scale,
        ignore_dropout=ignore_dropout,
        allow_tf32=allow_tf32,
    )


@dataclasses.dataclass(frozen=True)
class Patch:
    """What :func:`patch` replaced: the attention implementation the model had, and where."""

    attention: str
    implementation: str
    replaced: str
    modules: tuple[str, ...]
    settings: AttentionSettings


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
    allow_tf32: bool = False,
) -> str:
    """Register kexue's attention and mask functions with transformers; returns their name.

    With ``train_len``, the settings become the defaults of every attention module that
    :func:`patch` did not prepare, so that a model built with the name uses kexue from the start::

        name = register(train_len=512)
        model = transformers.AutoModel.from_config(config, attn_implementation=name)

    Without it only the functions are registered (idempotent) and the defaults stay as they were.
    """
    if train_len is not None:
        set_defaults(_validated(train_len, logn, clip, min_n, scale, ignore_dropout, allow_tf32))
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
    allow_tf32: bool = False,
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
        allow_tf32: float32 models only: TF32 tensor-core dots in the Triton kernels on GPUs (see
            :func:`kexue.ops.logn_attention`); the CPU and CUDA C++ backends compute in full float32.

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
    settings = _validated(train_len, logn, clip, min_n, scale, ignore_dropout, allow_tf32)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"found no attention module in {type(model).__name__} that calls transformers' attention registry"
        )
    _register_functions()
    replaced = model.config._attn_implementation
    for _, module in modules:
        setattr(module, SETTINGS_ATTR, settings)
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
        if hasattr(module, SETTINGS_ATTR):
            delattr(module, SETTINGS_ATTR)
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
