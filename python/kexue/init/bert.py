"""BERT's initialization of every submodule of a model, and GPT-2's depth scaling of residual projections."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ._checks import _check_generator, _check_module, _check_n_layers, _check_names, _check_std
from .truncated import TF_TRUNCATED_STD_RATIO, _draw

#: GPT-2 (``attn.c_proj``, ``mlp.c_proj``), Llama/Mistral/Qwen2 (``o_proj``, ``down_proj``),
#: BERT/RoBERTa (``attention.output.dense``, ``output.dense``), ``nn.TransformerEncoderLayer`` /
#: ``nn.MultiheadAttention`` / ``kexue.nn.LogNAttention`` (``out_proj``, ``linear2``),
#: GPT-NeoX (``attention.dense``, ``dense_4h_to_h``).
RESIDUAL_NAMES: tuple[str, ...] = (
    "c_proj",
    "o_proj",
    "down_proj",
    "output.dense",
    "out_proj",
    "linear2",
    "attention.dense",
    "dense_4h_to_h",
)

_LINEAR_LIKE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's own, or any class named like one (LlamaRMSNorm, T5LayerNorm, ...)."""
    return isinstance(module, _NORMS) or type(module).__name__.lower().endswith("norm")


def _is_linear_like(module: nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2) is a linear layer with a transposed weight
    return isinstance(module, _LINEAR_LIKE) or type(module).__name__ == "Conv1D"


def bert_(
    module: nn.Module,
    std: float = 0.02,
    *,
    truncated: bool = False,
    exact_std: bool = False,
    n_layers: int | None = None,
    residual_names: Iterable[str] = RESIDUAL_NAMES,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """BERT's initialization of every submodule of ``module``, in place.

    Per submodule (``module.modules()``, the module itself included):

    - ``nn.Linear``, ``nn.Bilinear``, convolutions, Hugging Face's ``Conv1D``: weight ~ N(0, std^2),
      bias 0;
    - ``nn.Embedding`` / ``nn.EmbeddingBag``: weight ~ N(0, std^2), then the ``padding_idx`` row 0
      (also when the table is tied to an output projection);
    - normalization layers (torch's LayerNorm, RMSNorm, GroupNorm, BatchNorm, and any class whose
      name ends in "Norm", e.g. ``LlamaRMSNorm``): weight 1, bias 0. Caveat: a norm that stores
      its gain as ``1 + weight`` (Gemma's RMSNorm) wants weight 0 instead; re-set it after this call;
    - any other module's own parameters: those of 2+ dims ~ N(0, std^2), those named "bias" or
      ending in "_bias" 0, the others (1-d scales, temperatures, ...) left as they are.

    A parameter shared by several modules is initialized once, by the first module that owns it.
    Buffers are never touched.

    Args:
        module: any ``nn.Module``.
        std: the std of the normal draws (BERT's ``initializer_range``, default 0.02), > 0.
        truncated: False (default) draws plain ``normal_(0, std)`` as Hugging Face's PyTorch BERT
            does; True draws TF's truncated normal (cut at +-2 std, realised std 0.0176 for 0.02)
            as the original TF BERT does. See :func:`trunc_normal_tf_`.
        exact_std: with ``truncated=True``, widen the draw so that the realised std is ``std``
            (no effect on plain normal draws, whose realised std is already ``std``).
        n_layers: if given, then apply :func:`scale_residual_` with this number of residual blocks
            (transformer layers) and ``residual_names``.
        residual_names: see :func:`scale_residual_`; used only with ``n_layers``.
        generator: the random generator to draw from (on the parameters' device); default torch's.

    Returns:
        ``module``.
    """
    _check_module(module, "bert_")
    std = _check_std(std)
    _check_generator(generator)
    residual = None
    if n_layers is not None:  # find the projections first: a bad ``residual_names`` leaves the module as it was
        factor = _depth_factor(n_layers)
        residual = _residual_weights(module, _check_names(residual_names))
    if truncated and exact_std:
        std /= TF_TRUNCATED_STD_RATIO

    seen: set[int] = set()

    def fresh(p: torch.Tensor | None) -> bool:
        if p is None or id(p) in seen:
            return False
        seen.add(id(p))
        return True

    with torch.no_grad():
        for m in module.modules():
            own = dict(m.named_parameters(recurse=False))
            weight, bias = own.get("weight"), own.get("bias")
            if _is_norm(m):
                if fresh(weight):
                    weight.fill_(1.0)
                if fresh(bias):
                    bias.zero_()
            elif _is_linear_like(m) or isinstance(m, _EMBEDDINGS):
                if fresh(weight):
                    _draw(weight, std, 0.0, truncated, generator)
                if fresh(bias):
                    bias.zero_()
            else:
                for name, p in own.items():
                    if not fresh(p):
                        continue
                    if p.dim() >= 2:
                        _draw(p, std, 0.0, truncated, generator)
                    elif name == "bias" or name.endswith("_bias"):
                        p.zero_()
                    else:
                        seen.discard(id(p))  # untouched: a later owner may still initialize it
        # last, so that an output projection tied to the table cannot undo it
        for m in module.modules():
            if isinstance(m, _EMBEDDINGS) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        for weight in residual or ():
            weight.mul_(factor)
    return module


def _matches(qualified: str, suffix: str) -> bool:
    """``suffix`` names the module ``qualified`` whole components at a time ("output.dense" matches
    "encoder.layer.0.output.dense" and "...attention.output.dense", not "...intermediate.dense")."""
    return qualified == suffix or qualified.endswith("." + suffix)


def scale_residual_(module: nn.Module, n_layers: int, names: Iterable[str] = RESIDUAL_NAMES) -> nn.Module:
    """Divide the weights of residual-branch output projections by sqrt(2 * n_layers), in place.

    GPT-2's convention (also Megatron's ``output_layer_init_method``): each of the ``n_layers``
    blocks adds two residual branches (attention, MLP), and scaling their last projection by
    1/sqrt(2 n_layers) keeps the variance of the residual stream at the end of the stack near that
    of one branch. It multiplies the existing weights, so after :func:`bert_` with std s they are
    N(0, s^2 / (2 n_layers)); call it once (a second call scales again). Biases are left as they
    are (0 after :func:`bert_`).

    docs/init.md (after kexue.fm/archives/8747) analyses std 0.02 and Post-Norm vs
    Pre-Norm but prescribes no depth scaling; this is the common convention, chosen where it is
    silent. (DeepNet's rule is a different one: it also scales the value projections, by
    (8N)^(-1/4) for an encoder; use ``names`` and your own factor for it.)

    Args:
        module: any ``nn.Module``.
        n_layers: the number of transformer blocks (each with two residual branches), >= 1.
        names: module-name suffixes, matched whole dotted components at a time against
            ``module.named_modules()`` (default :data:`RESIDUAL_NAMES`: GPT-2, Llama, Mistral, Qwen2,
            BERT, RoBERTa, GPT-NeoX, ``nn.Transformer*`` and ``kexue.nn.LogNAttention`` names).
            Every matched module must have a ``weight``.

    Returns:
        ``module``.

    Raises:
        ValueError: no module matched ``names`` (nothing would be scaled, silently).
    """
    _check_module(module, "scale_residual_")
    factor = _depth_factor(n_layers)
    weights = _residual_weights(module, _check_names(names))
    with torch.no_grad():
        for weight in weights:
            weight.mul_(factor)
    return module


def _depth_factor(n_layers) -> float:
    return 1.0 / math.sqrt(2.0 * _check_n_layers(n_layers))


def _residual_weights(module: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The distinct weights of the submodules matched by ``names``; ValueError if there are none."""
    found: dict[int, torch.Tensor] = {}
    for qualified, m in module.named_modules():
        if qualified and any(_matches(qualified, s) for s in names):
            weight = getattr(m, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(
                    f"residual projection {qualified!r} ({type(m).__name__}) matched names but has no weight tensor"
                )
            found.setdefault(id(weight), weight)
    if not found:
        raise ValueError(
            f"no submodule name ends with any of the residual names {names!r}; "
            f"pass the names of the residual output projections of this model"
        )
    return list(found.values())
