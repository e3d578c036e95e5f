"""The entropy-normalization Triton launchers: few Newton steps, the empty batch, every launch
configuration compiled ahead of time, the streamed grid, the public op forced to the triton backend,
and an LLM-vocabulary batch on a CUDA GPU.
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

from tests.entropy_norm.triton_helpers import TOL, Tile, check, random_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


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
