"""Argument checks of kexue.init: each names the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


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
