"""The Triton kernels of entropy normalization on every row kind and edge case of the spec (non-finite
logits, unreachable targets, ...) and on float32 corner cases, against the float32 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from kexue.reference import entropy_norm as ref
from tests.helpers import assert_close, reachable_targets

pytest.importorskip("triton")
from kexue.triton_kernels import entropy_norm as K  # noqa: E402  (after the skip)

from tests.entropy_norm.triton_helpers import TOL, Tile, check  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN
NINF, INF, NAN = -math.inf, math.inf, math.nan
LOG8 = math.log(8)


def special_rows(generator):
    """(logits (R, 8) float64, targets (R,) float64, what each row exercises)."""
    z = torch.randn(17, 8, dtype=torch.float64, generator=generator)
    t = reachable_targets(17, 8, generator=generator)
    notes = ["plain"] * 17
    z[1, [0, 3, 6]] = NINF
    t[1] = 0.6 * math.log(5)
    notes[1] = "masked entries"
    z[2] = NINF
    z[2, 4] = 1.5
    t[2] = 0.5
    notes[2] = "one finite entry: uniform over the support (one-hot)"
    z[3] = 0.3
    t[3] = 1.0
    notes[3] = "constant row, target below log n: argmax, gamma inf"
    z[4] = -0.7
    t[4] = LOG8 + 1e-6
    notes[4] = "constant row, target log n: uniform, gamma 0"
    z[5, [0, 2]] = z[5].max() + 1.0
    t[5] = 0.3
    notes[5] = "two tied maxima (one chunk when chunked), target below log 2: argmax"
    t[6] = 0.0
    notes[6] = "target 0: argmax"
    z[7, [1, 2, 3, 4]] = NINF
    t[7] = math.log(4) + 0.1
    notes[7] = "target above log(support): uniform over the support"
    z[8, 3] = NAN
    notes[8] = "NaN: invalid"
    z[9, 6] = INF
    notes[9] = "+inf: invalid"
    z[10] = NINF
    notes[10] = "no finite entry: invalid"
    z[11] *= 20.0
    t[11] = 0.95 * LOG8
    notes[11] = "peaked row, high target: small gamma, Newton overshoots below 0 (bisection)"
    z[12] *= 0.05
    t[12] = 0.2
    notes[12] = "flat row, low target: large gamma (doubling)"
    p13 = torch.softmax(z[13], -1)
    t[13] = -(p13 * torch.log(p13)).sum()
    notes[13] = "already at the target: gamma 1"
    z[14, [1, 6]] = z[14].max() + 0.5
    t[14] = 0.6
    notes[14] = "two tied maxima in different chunks when chunked: argmax"
    z[15] = NINF
    z[15, 6] = -3.0
    t[15] = 0.0
    notes[15] = "one finite entry, target 0 = log(support) = log(ties): uniform takes precedence"
    t[16] = NAN
    notes[16] = "NaN target: invalid"
    return z, t, notes


@pytest.mark.parametrize("chunked", [False, True], ids=["single_tile", "chunked"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_special_rows(triton_device, dtype, logits, chunked):
    g = torch.Generator().manual_seed(5)
    z, t, _ = special_rows(g)
    if logits:
        x = z
    else:
        # Unnormalised probabilities exp(z - max finite z): -inf -> 0, NaN and +inf stay.
        x = torch.exp(z - z.nan_to_num(nan=NINF, posinf=NINF).amax(-1, keepdim=True).clamp_min(-1e300))
        x[0, 2] = -0.25  # a negative probability: log is NaN, the row is invalid
    x = x.to(dtype)
    # NaN gradients arriving at NaN outputs (invalid rows) or at masked entries (-inf logits, zero
    # probabilities) must not leak: the reference gives those rows and entries zero gradient.
    y_r, gamma_r, _ = ref.entropy_normalize_forward(x.double(), t, logits, 20, TOL)
    masked = x.double() == (NINF if logits else 0.0)
    grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grad_y = torch.where(torch.isnan(y_r) | masked, NAN, grad_y).to(dtype)
    grad_gamma = torch.where(torch.isnan(gamma_r), NAN, torch.randn(x.shape[0], generator=g, dtype=torch.float64))
    tile = Tile(1, 4, False, 4) if chunked else None  # 8 columns in two chunks, one row a program
    y, gamma = check(
        x.to(triton_device),
        t.float().to(triton_device),
        logits,
        tile=tile,
        grad_y=grad_y,
        grad_gamma=grad_gamma.float(),
    )
    # The row kinds came out as designed (assert_close already matched the reference's NaN/inf).
    gamma = gamma.cpu()
    assert torch.isinf(gamma[[3, 5, 6, 14]]).all() and (gamma[[2, 4, 7, 15]] == 0).all()
    assert torch.isnan(gamma[[8, 9, 10, 16]]).all()
    assert torch.isnan(gamma[0]) != logits
    assert gamma[11] < 1 < gamma[12]


def test_float32_corner_cases_follow_the_float32_reference(triton_device):
    """Branches that only float32 rounding reaches, against the reference run in float32 (the same
    algorithm in the same precision; float64 takes a different path on these rows)."""
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    t = torch.empty(3)
    # Three maxima and an entry 1e-30 below them: Var_y(u) underflows to 0 in float32 while the
    # entropy is above a target in (log 3, log 4). No Newton step exists, so gamma doubles every
    # iteration up to 2**max_iter; the backward sees var = 0 and returns zero gradient.
    z[0] = torch.tensor([0.0, 0.0, 0.0, -1e-30, NINF, NINF, NINF, NINF])
    t[0] = 0.5 * (math.log(3) + math.log(4))
    # Target float32(log 8), which lies above log 8: uniform, gamma exactly 0 (the thresholds are
    # compared in float64, so every backend agrees whatever its float32 log rounds to).
    t[1] = torch.tensor(LOG8, dtype=torch.float32)
    # A plain Newton row alongside.
    t[2] = 1.0
    y, gamma, stats = K.forward(z.to(triton_device), t.to(triton_device), True, 20, TOL)
    y_r, gamma_r, stats_r = ref.entropy_normalize_forward(z, t, True, 20, TOL)
    assert gamma_r[0] == 2.0**20 and gamma_r[1] == 0  # the branches this test is about
    for out, expected, what in ((y, y_r, "y"), (gamma, gamma_r, "gamma"), (stats, stats_r, "stats")):
        assert_close(out.cpu(), expected, torch.float32, what)
    grad_y = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    grad_gamma = torch.tensor([0.5, -1.0, 2.0])
    grad_x, grad_target = K.backward(
        grad_y.to(triton_device), grad_gamma.to(triton_device), z.to(triton_device), gamma, stats, True
    )
    grad_x_r, grad_target_r = ref.entropy_normalize_backward(grad_y, grad_gamma, z, gamma_r, stats_r, True)
    assert (grad_x_r[:2] == 0).all() and (grad_target_r[:2] == 0).all()
    assert_close(grad_x.cpu(), grad_x_r, torch.float32, "grad_x")
    assert_close(grad_target.cpu(), grad_target_r, torch.float32, "grad_target")
