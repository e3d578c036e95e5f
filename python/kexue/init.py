"""BERT-style initialization as plain in-place functions (docs/init.md, kexue.fm/archives/8747).

Three functions, each PyTorch-style (trailing underscore, in place, under ``torch.no_grad()``,
returning what it was given, ``generator=`` for reproducible draws):

- :func:`trunc_normal_tf_` (a tensor): TensorFlow's ``truncated_normal``, cut at +-2 std *relative*
  to the requested std. Its realised std is ``std * TF_TRUNCATED_STD_RATIO`` (0.0176 for 0.02);
  ``exact_std=True`` corrects the request so that the realised std is ``std``.
- :func:`bert_` (a module): BERT's initialization of every submodule: linear/conv weights and
  embeddings ~ N(0, std) (plain normal as in Hugging Face's PyTorch BERT, or ``truncated=True``
  as in the original TF BERT), biases 0, padding rows of embeddings 0, norm gains 1 and shifts 0;
  ``n_layers=`` adds the depth scaling of :func:`scale_residual_`.
- :func:`scale_residual_` (a module): divides the weights of the residual-branch output projections
  by sqrt(2 * n_layers) (GPT-2's convention), so that the sum of 2 * n_layers residual branches
  keeps the variance of one at initialization.

Why 0.02 (the spec's summary): about half of Xavier's 1/sqrt(768) for BERT-base, small enough that
each Post-Norm block is close to the identity at init (less gradient vanishing), large enough to
keep diversity. The implementer trap: ``torch.nn.init.trunc_normal_(t, std=0.02)`` cuts at the
ABSOLUTE values -2 and 2, i.e. it does not truncate at all for std 0.02.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["TF_TRUNCATED_STD_RATIO", "RESIDUAL_NAMES", "trunc_normal_tf_", "bert_", "scale_residual_"]

_BOUND = 2.0  # TF truncated_normal redraws values more than 2 standard deviations from the mean


def _truncated_std_ratio(bound: float) -> float:
    """sqrt(gamma): the std of N(0, 1) truncated to [-bound, bound].

    gamma = int_{-b}^{b} x^2 phi(x) dx / int_{-b}^{b} phi(x) dx; integrating the numerator by parts
    (x^2 phi = -x phi') gives  int = Z - 2 b phi(b),  Z = erf(b / sqrt 2), so gamma = 1 - 2 b phi(b) / Z.
    """
    phi = math.exp(-0.5 * bound * bound) / math.sqrt(2.0 * math.pi)
    return math.sqrt(1.0 - 2.0 * bound * phi / math.erf(bound / math.sqrt(2.0)))


#: Realised std / requested std of TF's truncated normal: sqrt(0.7737413...) = 0.8796257...
TF_TRUNCATED_STD_RATIO: float = _truncated_std_ratio(_BOUND)

#: Default name suffixes of residual-branch output projections, per family:
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


# ----------------------------------------------------------------------------------------- checks


def _check_std(std, name: str = "std") -> float:
    if isinstance(std, bool) or not isinstance(std, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(std).__name__}")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {std!r}")
    return float(std)


def _check_mean(mean) -> float:
    if isinstance(mean, bool) or not isinstance(mean, (int, float)):
        raise TypeError(f"mean must be a float, got {type(mean).__name__}")
    if not math.isfinite(mean):
        raise ValueError(f"mean must be finite, got {mean!r}")
    return float(mean)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_module(module, fn: str) -> None:
    if not isinstance(module, nn.Module):
        hint = " (for a tensor use kexue.init.trunc_normal_tf_ or torch.nn.init)" if torch.is_tensor(module) else ""
        raise TypeError(f"{fn}: module must be a torch.nn.Module, got {type(module).__name__}{hint}")


def _check_n_layers(n_layers) -> int:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise TypeError(f"n_layers must be an int >= 1, got {type(n_layers).__name__}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return n_layers


def _check_names(names) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"names must be a tuple of module-name suffixes, got {type(names).__name__}")
    names = tuple(names)
    if not names or not all(isinstance(n, str) and n and not n.startswith(".") for n in names):
        raise ValueError(f"names must be a non-empty tuple of non-empty module-name suffixes, got {names!r}")
    return names


# -------------------------------------------------------------------------------------- sampling


def _draw(tensor: torch.Tensor, std: float, mean: float, truncated: bool, generator) -> None:
    """Fill ``tensor`` (any shape, floating) with N(mean, std^2), optionally TF-truncated at +-2 std.

    Draws in float32 (float64 for float64 tensors) on the tensor's device, then casts: the 16-bit
    dtypes get correctly rounded samples of the float32 law.
    """
    if generator is not None and generator.device.type != tensor.device.type:
        raise ValueError(
            f"generator is on device {generator.device}, but the tensor to fill is on {tensor.device}; "
            f"pass a torch.Generator(device={str(tensor.device)!r})"
        )
    if tensor.numel() == 0:
        return
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if not truncated:
        x = torch.empty(tensor.shape, dtype=work, device=tensor.device).normal_(mean, std, generator=generator)
    else:
        # Inverse CDF: u uniform on (Phi(-2), Phi(2)) -> x = Phi^-1(u) has exactly the law of
        # TF's rejection sampler (redraw until |x| <= 2) without a data-dependent loop.
        # In the erf parametrization: v = 2u - 1 uniform on (-erf(sqrt 2), erf(sqrt 2)), x = sqrt2 erfinv(v).
        edge = math.erf(_BOUND / math.sqrt(2.0))
        v = torch.empty(tensor.shape, dtype=work, device=tensor.device).uniform_(-edge, edge, generator=generator)
        # clamp: erfinv's rounding at the edges must not step past the bound
        x = torch.special.erfinv(v).mul_(math.sqrt(2.0)).clamp_(-_BOUND, _BOUND)
        x.mul_(std).add_(mean)
    tensor.copy_(x)


def trunc_normal_tf_(
    tensor: torch.Tensor,
    std: float = 0.02,
    mean: float = 0.0,
    *,
    exact_std: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` in place with TensorFlow's ``truncated_normal(mean, stddev=std)``.

    Values are N(mean, std^2) conditioned on |x - mean| <= 2 * std: the cut is RELATIVE to std
    (unlike ``torch.nn.init.trunc_normal_``, whose default cut is at the absolute values +-2).
    The realised std is ``std * TF_TRUNCATED_STD_RATIO`` (0.8796257, so 0.0176 for std 0.02).

    Args:
        tensor: a floating tensor of any shape (including empty); filled in place.
        std: the ``stddev`` argument of TF (the std before truncation), > 0.
        mean: the centre of the law.
        exact_std: draw with ``std / TF_TRUNCATED_STD_RATIO`` instead, so that the realised std is
            ``std`` (and the values lie within +-2 * std / 0.8796 of the mean).
        generator: the random generator to draw from (on the tensor's device); default torch's.

    Returns:
        ``tensor``.
    """
    if not torch.is_tensor(tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must have a floating dtype, got {tensor.dtype}")
    std, mean = _check_std(std), _check_mean(mean)
    _check_generator(generator)
    if exact_std:
        std /= TF_TRUNCATED_STD_RATIO
    with torch.no_grad():
        _draw(tensor, std, mean, True, generator)
    return tensor


# ------------------------------------------------------------------------------------- modules

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
