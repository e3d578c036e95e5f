"""Statistical checks shared by the kexue.init tests.

Statistical bounds. For n i.i.d. draws of a law with std s:
- the sample mean has standard error s / sqrt(n);
- the sample std has standard error ~ s * sqrt((kurtosis - 1) / (4 n)); the normal law has
  kurtosis 3 (SE = s / sqrt(2 n)) and the truncated normal a smaller one (its tails are cut), so
  s / sqrt(2 n) bounds both.
A test allows 6 standard errors (a false failure has probability ~2e-9 per check); the draws use a
fixed generator, so a run is also reproducible. For the shape of the law, the
Dvoretzky-Kiefer-Wolfowitz inequality P(sup_x |F_n(x) - F(x)| > eps) <= 2 exp(-2 n eps^2) gives
eps = sqrt(ln(2 / 1e-9) / (2 n)) at false-failure probability 1e-9.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SPEC_RATIO = 0.8796257  # docs/init.md: sqrt(gamma), gamma = 0.7737413
SIGMAS = 6.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_normal_stats(x: torch.Tensor, mean: float, std: float, what: str, slack: float = 0.0) -> None:
    """Sample mean and std of ``x`` within 6 standard errors of (mean, std); ``slack`` adds a
    relative allowance on std (rounding of 16-bit storage)."""
    x = x.detach().double().flatten()
    n = x.numel()
    got_mean, got_std = float(x.mean()), float(x.std())
    tol_mean = SIGMAS * std / math.sqrt(n)
    tol_std = SIGMAS * std / math.sqrt(2 * n) + slack * std
    assert abs(got_mean - mean) <= tol_mean, f"{what}: mean {got_mean:.6g}, expected {mean} +- {tol_mean:.3g}"
    assert abs(got_std - std) <= tol_std, f"{what}: std {got_std:.6g}, expected {std:.6g} +- {tol_std:.3g}"


class CustomRMSNorm(nn.Module):
    """Not a torch norm: recognised by its name, as LlamaRMSNorm and T5LayerNorm are."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.RMSNorm(d)
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class Toy(nn.Module):
    """Embedding with a padding row, tied output head, blocks, a custom norm, bare parameters."""

    def __init__(self, vocab=300, d=128, layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=1)
        self.pos = nn.Parameter(torch.empty(64, d))  # 2-d bare parameter: drawn
        self.extra_bias = nn.Parameter(torch.empty(d))  # named like a bias: zeroed
        self.temperature = nn.Parameter(torch.empty(1))  # neither: left as it is
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.final_norm = CustomRMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: the head comes after the embedding


def poisoned_toy(**kwargs) -> Toy:
    model = Toy(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    return model
