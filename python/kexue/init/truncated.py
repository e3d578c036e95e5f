"""TensorFlow's truncated normal (cut at +-2 std relative to std) and the draw kexue.init fills with."""

from __future__ import annotations

import math

import torch

from ._checks import _check_generator, _check_mean, _check_std

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
