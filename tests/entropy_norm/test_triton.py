"""The Triton kernels of entropy normalization against the float64 reference.

Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes are small but cover the block edges of both layouts
(the whole row in one tile, and rows streamed in chunks), every row kind (Newton, uniform,
argmax, invalid) and both input forms (logits, probabilities). Outputs are allocated by the
launchers with torch.empty, which deterministic mode fills with NaN, so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue import _backend
from kexue.ops import entropy_normalize
from kexue.reference import entropy_norm as ref
from tests.helpers import assert_close, fresh_probs, reachable_targets

pytest.importorskip("triton")
from kexue.triton_kernels import entropy_norm as K  # noqa: E402  (after the skip)

TOL = ref.default_tol(torch.float32)  # what kexue.ops passes for 16/32-bit inputs
Tile = K.Tile


pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


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


# ---------------------------------------------------------------------------------------------
# Random rows at block edges, reaching every single-tile configuration: n = 1..16 share a tile of
# 32 rows x 16 columns, 17 starts the next one; 127/128/129 straddle a power of two; from 512 on,
# one row per program; R is rarely a multiple of BLOCK_M.

SHAPES = [
    (67, 1),
    (5, 2),
    (9, 15),
    (8, 16),
    (7, 17),
    (5, 40),
    (3, 127),
    (3, 128),
    (9, 129),
    (3, 300),
    (2, 1000),
    (1, 1024),
    (2, 1025),
    (1, 3000),
]


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("rows,n", SHAPES)
def test_random_rows_float32(triton_device, rows, n, logits):
    g = torch.Generator().manual_seed(1000 * rows + n)
    x, target = random_rows(rows, n, torch.float32, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, generator=g)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows,n", [(9, 15), (3, 129)])
def test_random_rows_16bit(triton_device, rows, n, dtype, logits):
    g = torch.Generator().manual_seed(7 * rows + n)
    x, target = random_rows(rows, n, dtype, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, generator=g)


# ---------------------------------------------------------------------------------------------
# The streamed layout: as the launchers pick it for long rows, and forced with small chunks so
# that short rows cross several chunk boundaries (one row a program, as the forward streams).


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("n", [K.MAX_SINGLE_TILE_BACKWARD + 3, K.MAX_SINGLE_TILE_FORWARD + 2 * K._STREAM.block_n + 5])
def test_long_rows(triton_device, n, logits):
    assert not K.backward_tile(n).single_tile
    g = torch.Generator().manual_seed(n)
    x, target = random_rows(2, n, torch.float32, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, generator=g)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,n", [(3, 1), (3, 16), (5, 17), (3, 50)])
def test_forced_small_chunks(triton_device, rows, n, dtype, logits):
    g = torch.Generator().manual_seed(31 * rows + n)
    x, target = random_rows(rows, n, dtype, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, tile=Tile(1, 16, False, 4), generator=g)


# ---------------------------------------------------------------------------------------------
# Every row kind and the edge cases of the spec, in one batch of logits rows of n = 8.

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


# ---------------------------------------------------------------------------------------------
# Rough control (1-2 Newton steps, as in the post), the empty batch, the launchers' configurations.


@pytest.mark.parametrize("max_iter", [1, 2])
def test_few_iterations_follow_the_same_path(triton_device, max_iter):
    g = torch.Generator().manual_seed(max_iter)
    x, target = random_rows(6, 37, torch.float32, True, g, sharpness=3.0)
    check(x.to(triton_device), target.to(triton_device), True, max_iter=max_iter, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch(triton_device, dtype):
    x = torch.empty(0, 5, dtype=dtype, device=triton_device)
    y, gamma, stats = K.forward(x, torch.empty(0, device=triton_device), True, 20, TOL)
    assert (y.shape, y.dtype, gamma.shape, stats.shape) == ((0, 5), dtype, (0,), (0, 2))
    grad_x, grad_target = K.backward(torch.empty_like(x), torch.empty(0, device=triton_device), x, gamma, stats, True)
    assert (grad_x.shape, grad_x.dtype, grad_target.shape) == ((0, 5), dtype, (0,))


def test_every_launch_configuration_is_compiled_ahead_of_time():
    """tests/gpu_compile.py compiles AOT_CONFIGS; the launchers must never pick anything else."""
    shipped = {
        (c["kernel"], tuple(sorted(c["constexprs"].items())), c["num_warps"], c["signature"]["x_ptr"])
        for c in K.AOT_CONFIGS
    }
    lengths = list(range(1, 300)) + [2**k + d for k in range(8, 16) for d in (-1, 0, 1)] + [10**6, 2**31 - 1]
    for n in lengths:
        fwd, bwd = K.forward_tile(n), K.backward_tile(n)
        for ptr in ("*fp16", "*bf16", "*fp32"):
            for logits in (True, False):
                if fwd.single_tile:
                    consts = dict(LOGITS=logits, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n)
                    kernel = K.entropy_norm_fwd_tile_kernel
                else:
                    assert fwd.block_m == 1
                    consts = dict(LOGITS=logits, BLOCK_N=fwd.block_n)
                    kernel = K.entropy_norm_fwd_stream_kernel
                key = (kernel, tuple(sorted(consts.items())), fwd.num_warps, ptr)
                assert key in shipped, f"n={n}: forward {fwd} {ptr} logits={logits} not in AOT_CONFIGS"
                consts = dict(LOGITS=logits, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n, SINGLE_TILE=bwd.single_tile)
                key = (K.entropy_norm_bwd_kernel, tuple(sorted(consts.items())), bwd.num_warps, ptr)
                assert key in shipped, f"n={n}: backward {bwd} {ptr} logits={logits} not in AOT_CONFIGS"
        assert fwd.single_tile == (n <= K.MAX_SINGLE_TILE_FORWARD)
        assert bwd.single_tile == (n <= K.MAX_SINGLE_TILE_BACKWARD)


def test_streamed_forward_takes_one_row_a_program(triton_device):
    x = torch.rand(2, 8, device=triton_device)
    with pytest.raises(ValueError, match="one row a program"):
        K.forward(x, torch.ones(2, device=triton_device), False, 20, TOL, tile=Tile(2, 4, False, 4))


# ---------------------------------------------------------------------------------------------
# The public op with the backend forced to triton, forward and autograd, against float64 torch.


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
def test_public_op_through_triton_backend(triton_backend, logits):
    g = torch.Generator().manual_seed(11)
    p = fresh_probs(6, 9, generator=g).reshape(2, 3, 9).transpose(1, 2)  # (2, 9, 3): rows along dim=1
    x64 = (torch.log(p) if logits else p).contiguous()
    t64 = reachable_targets(6, 9, generator=g).reshape(2, 3)
    w = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def run(x, t):
        x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
        y, gamma = entropy_normalize(x, t, dim=1, logits=logits, return_gamma=True)
        ((y.double() * w.to(y.device)).sum() + (gamma.double() * v.to(y.device)).sum()).backward()
        return y, gamma, x.grad, t.grad

    x32, t32 = x64.float().to(triton_backend), t64.float().to(triton_backend)
    assert _backend.select("entropy_normalize", x32)[0] == "triton"
    y, gamma, gx, gt = run(x32, t32)
    with kexue.use_backend("torch"):
        y_r, gamma_r, gx_r, gt_r = run(x32.detach().cpu().double(), t32.detach().cpu().double())
    assert y.dtype == torch.float32 and gamma.dtype == torch.float32 and gx.dtype == torch.float32
    for out, expected, what in (
        (y, y_r, "y"),
        (gamma, gamma_r, "gamma"),
        (gx, gx_r, "grad x"),
        (gt, gt_r, "grad target"),
    ):
        assert_close(out.detach().cpu(), expected, torch.float32, what)


# ---------------------------------------------------------------------------------------------
# Production size on a GPU: an LLM vocabulary (128k) for 4096 rows in bf16.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="production-size run needs a GPU")
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
def test_llm_vocabulary_rows_bf16_on_gpu(logits):
    rows, n = 4096, 131072
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(rows, n, device="cuda", generator=g) * 2
    x = (z if logits else torch.softmax(z, -1)).to(torch.bfloat16)
    target = torch.rand(rows, device="cuda", generator=g) * (0.9 * math.log(n)) + 0.05 * math.log(n)
    y, gamma, stats = K.forward(x, target, logits, 20, TOL)
    torch.cuda.synchronize()
    # every 64th row against the float64 reference (64 rows x 128k: seconds on the CPU)
    picked = torch.arange(0, rows, 64, device="cuda")
    y_r, gamma_r, _ = ref.entropy_normalize_forward(
        x[picked].cpu().double(), target[picked].cpu().double(), logits, 20, TOL
    )
    assert_close(y[picked].cpu(), y_r, torch.bfloat16, "y")
    assert_close(gamma[picked].cpu(), gamma_r, torch.float32, "gamma")
    assert torch.isfinite(y).all() and torch.isfinite(gamma).all()
    grad_x, grad_target = K.backward(torch.randn_like(y), torch.randn_like(gamma), x, gamma, stats, logits)
    assert torch.isfinite(grad_x.float()).all() and torch.isfinite(grad_target).all()
