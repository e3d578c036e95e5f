"""Tiger (kexue.optim) on every backend against the float64 oracle, step by step and element by element
(tests/sign_optim/helpers.py explains the check): its configurations, the cache batches of the C++
step, and 16-bit params."""

from __future__ import annotations

import pytest
import torch

from kexue.optim import Tiger
from tests.sign_optim.helpers import BACKENDS, NATIVE, drive, make_params, random_grads

TIGER_CONFIGS = {
    "default": dict(),
    "accumulate3": dict(grad_accum_steps=3, weight_decay=0.1),
    "rms_constant": dict(rms_scale=0.125),
    "no_rms_maximize": dict(rms_scale=False, maximize=True, nan_guard=None),
    "bf16_state": dict(momentum_dtype=torch.bfloat16),
    "child_tuning_f": dict(child_tuning="F", reserve_p=0.4),
    "child_tuning_f_grad_only": dict(child_tuning="F", reserve_p=0.5, mask_update=False),
    "nan_tensor": dict(nan_guard="tensor"),
    "nan_global": dict(nan_guard="global", grad_accum_steps=2),
}


def _tiger_params(dtype=torch.float32):
    # matrix, "gamma" (named like a norm weight), "bias", and a big matrix over several items
    shapes = [(5, 7), (96,), (96,), (2, 33_001)]
    params = make_params(shapes, dtype, seed=3)
    params[1].data = params[1].data * 0.1 + 1  # norm gains sit around 1
    names = ["lin.weight", "norm.weight", "lin.bias", "big.weight"]
    return params, list(zip(names, params, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(TIGER_CONFIGS))
def test_tiger_matches_oracle(backend, config):
    options = TIGER_CONFIGS[config]
    params, named = _tiger_params()
    opt = Tiger(named, lr=2e-2, seed=11, **options)
    assert [opt._kind(opt.param_groups[0], i, p) for i, p in enumerate(params)] == ["matrix", "gamma", "bias", "matrix"]

    def grads_at(t):
        gs = random_grads(params, 300 + t)
        if config.startswith("nan") and t in (2, 3):
            gs[0].view(-1)[3] = float("nan")  # one NaN in one tensor
        return gs

    drive(opt, params, 6, grads_at, backend, "tiger")
    if config == "nan_global":  # every tensor was shrunk on the NaN steps: the gain moved towards 1
        assert all(int(opt.state[p]["step"]) == 6 for p in params)


@pytest.mark.skipif(not NATIVE, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("nan_guard", ["tensor", "global"])
@pytest.mark.parametrize("batch_bytes", [None, 4 << 20])
def test_tiger_cache_batches_match_oracle(nan_guard, batch_bytes, monkeypatch):
    """The CPU step runs its pre-pass (RMS, NaN check) and main pass batch by batch; a batch closes
    once its pre-pass reads the batch size, 128 MB by default (csrc/cpu/sign_optim.cpp,
    cache_batches), and never inside a NaN group. The three tensors here hold 18 MB of params and
    18 MB of grads each: with the default the step is one batch; with 4 MB
    (KEXUE_SIGN_OPTIM_BATCH_BYTES) every tensor closes a batch of its own under "tensor", while
    under "global" the NaN group holds all of them in one. A NaN in the last tensor must hold back
    the tensors before it under "global" either way."""
    if batch_bytes is None:
        monkeypatch.delenv("KEXUE_SIGN_OPTIM_BATCH_BYTES", raising=False)
    else:
        monkeypatch.setenv("KEXUE_SIGN_OPTIM_BATCH_BYTES", str(batch_bytes))
    params = make_params([(3, 1_500_000)] * 3 + [(1000,)], torch.float32, seed=5)
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    opt = Tiger(named, lr=2e-2, nan_guard=nan_guard)

    def grads_at(t):
        gs = random_grads(params, 500 + t)
        if t == 1:
            gs[2].view(-1)[-1] = float("nan")
        return gs

    # drive checks both steps against the oracle, which shrinks tensors 0-2 on step 1 under
    # "global" and only tensor 2 under "tensor": a split group would fail it.
    drive(opt, params, 2, grads_at, "cpu", "tiger")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiger_16bit_params(backend, dtype):
    params, named = _tiger_params(dtype)
    opt = Tiger(named, lr=5e-2, weight_decay=0.1)
    drive(opt, params, 3, lambda t: random_grads(params, 400 + t), backend, "tiger")
