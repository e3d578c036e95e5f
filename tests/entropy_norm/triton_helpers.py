"""Random rows and the float64-reference check shared by the entropy-normalization Triton test
modules (import it after their triton skip).
"""

from __future__ import annotations

import pytest
import torch

from kexue.reference import entropy_norm as ref
from tests.helpers import assert_close, fresh_probs, reachable_targets

pytest.importorskip("triton")
from kexue.triton_kernels import entropy_norm as K  # noqa: E402  (after the skip)

TOL = ref.default_tol(torch.float32)  # what kexue.ops passes for 16/32-bit inputs
Tile = K.Tile


def random_rows(rows, n, dtype, logits, generator, sharpness=2.0):
    """Fresh distributions (or their logits) in ``dtype`` and reachable targets in float32."""
    p = fresh_probs(rows, n, sharpness=sharpness, generator=generator)
    x = torch.log(p) + torch.randn(rows, 1, dtype=torch.float64, generator=generator) if logits else p
    return x.to(dtype), reachable_targets(rows, n, generator=generator).float()


def check(x, target, logits, *, max_iter=20, tile=None, grad_y=None, grad_gamma=None, generator=None):
    """Forward and backward of the kernels on ``x`` vs the float64 reference on the same values.

    Outputs in x.dtype are held to RTOL[x.dtype]; float32 outputs (gamma, stats, grad_target) are
    computed in float32 from exactly those input values, so they are held to RTOL[float32].
    ``tile`` forces one configuration for both kernels (else the launchers' heuristics choose).
    """
    dtype, (rows, n) = x.dtype, x.shape
    y, gamma, stats = K.forward(x, target, logits, max_iter, TOL, tile=tile)
    assert (y.dtype, y.shape) == (dtype, x.shape)
    assert (gamma.dtype, gamma.shape) == (torch.float32, (rows,))
    assert (stats.dtype, stats.shape) == (torch.float32, (rows, 2))

    x64 = x.detach().cpu().double()
    y_r, gamma_r, stats_r = ref.entropy_normalize_forward(x64, target.cpu().double(), logits, max_iter, TOL)
    assert_close(y.cpu(), y_r, dtype, "y")
    assert_close(gamma.cpu(), gamma_r, torch.float32, "gamma")
    assert_close(stats.cpu(), stats_r, torch.float32, "stats")

    if grad_y is None:
        grad_y = torch.randn(rows, n, generator=generator, dtype=torch.float64).to(dtype)
    if grad_gamma is None:
        grad_gamma = torch.randn(rows, generator=generator, dtype=torch.float64).float()
    grad_y, grad_gamma = grad_y.to(x.device), grad_gamma.to(x.device)
    grad_x, grad_target = K.backward(grad_y, grad_gamma, x, gamma, stats, logits, tile=tile)
    assert (grad_x.dtype, grad_x.shape) == (dtype, x.shape)
    assert (grad_target.dtype, grad_target.shape) == (torch.float32, (rows,))
    grad_x_r, grad_target_r = ref.entropy_normalize_backward(
        grad_y.cpu().double(), grad_gamma.cpu().double(), x64, gamma_r, stats_r, logits
    )
    assert_close(grad_x.cpu(), grad_x_r, dtype, "grad_x")
    assert_close(grad_target.cpu(), grad_target_r, torch.float32, "grad_target")
    return y, gamma
