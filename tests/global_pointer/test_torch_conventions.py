"""The GlobalPointer ops as PyTorch ops: torch.compile full graph, opcheck, and which backend serves
which head size.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.ops import _global_pointer_inputs as ops
from kexue.ops import global_pointer_loss, global_pointer_scores
from tests.global_pointer.helpers import CPU_BACKENDS, make_problem
from tests.helpers import rel_err


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    q, k, sb, eb, mask, labels = make_problem(2, 12, 2, 4, dtype=torch.float32, seed=20)
    idx = labels.nonzero()

    def step(q, k, sb, eb, labels, mask):
        return global_pointer_loss(q, k, sb, eb, labels, mask) + global_pointer_scores(q, k, sb, eb, mask).amax()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with kexue.use_backend(backend):
        for lab in (labels, idx):
            leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
            out = compiled(*leaves, lab, mask)
            grads = torch.autograd.grad(out, leaves)
            leaves2 = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
            expected = step(*leaves2, lab, mask)
            grads2 = torch.autograd.grad(expected, leaves2)
            assert rel_err(out, expected) < 1e-6
            for a, b in zip(grads, grads2, strict=False):
                assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, sb, eb, mask, labels = make_problem(2, 10, 3, 4, dtype=torch.float32, seed=21)
    q4, k4, s4, e4, m, code, base = ops.canonical(q, k, sb, eb, mask, True, 10000.0)
    leaves = [t.requires_grad_() for t in (q4, k4, s4, e4)]
    with kexue.use_backend(backend):
        for lab in (labels, labels.nonzero()):
            torch.library.opcheck(torch.ops.kexue.global_pointer_loss, (*leaves, m, lab, code, base, True))
        torch.library.opcheck(torch.ops.kexue.global_pointer_scores, (*leaves, m, code, base, True))
        torch.library.opcheck(torch.ops.kexue.global_pointer_scores, (*leaves, m, 0, base, False))


def test_backends_declare_the_heads_they_serve(monkeypatch):
    """The dispatcher asks each backend once per call whether it serves it: a head beyond the CUDA
    C++ kernels and the Triton tiles is declined by both with a reason, and forcing one of them
    names every backend's reason. (Every backend is made "present" and a stand-in CUDA entry is
    registered if this build has none: the CUDA kernels cannot run here; meta tensors carry the
    shapes.)"""
    from kexue import _backend
    from kexue.ops import _global_pointer_backends as gpb

    monkeypatch.setattr(_backend, "_device_reason", lambda name, device: None)
    if "cuda" not in _backend._REGISTRY[gpb.OP_LOSS]:
        monkeypatch.setitem(
            _backend._REGISTRY[gpb.OP_LOSS],
            "cuda",
            _backend.Impl(lambda *a: "cuda", gpb.ALL_FLOATS, gpb._cuda_supports),
        )
    narrow = torch.empty(1, 1, 4, 64, device="meta", dtype=torch.bfloat16)
    wide = torch.empty(1, 1, 4, gpb.CUDA_MAX_HEAD_SIZE + 2, device="meta")
    why = _backend.reasons(gpb.OP_LOSS, wide)
    assert "heads up to" in why["cuda"] and "heads up to" in why["triton"]
    assert why["torch"] is None
    assert _backend.reasons(gpb.OP_LOSS, narrow)["cuda"] is None
    assert _backend.reasons(gpb.OP_LOSS, narrow)["triton"] is None
    with kexue.use_backend("cuda"):
        with pytest.raises(_backend.BackendUnavailableError) as err:
            _backend.select(gpb.OP_LOSS, wide)
        assert _backend.select(gpb.OP_LOSS, narrow)[0] == "cuda"
    assert all(f"{name}:" in str(err.value) for name in _backend.NAMES)


def test_128_channel_heads_pick_triton(monkeypatch):
    """Heads of 65..128 channels are served by the Triton tiles (loss: fp16/bf16; scores: every
    float dtype), so the automatic choice on a GPU picks Triton for them; 129 channels and the fp32
    loss go to the next backend. (Meta tensors stand for CUDA ones, ordered as on a GPU; a
    stand-in CUDA entry is registered if this build has none.)"""
    from kexue import _backend
    from kexue.ops import _global_pointer_backends as gpb

    monkeypatch.setattr(_backend, "_device_reason", lambda name, device: None)
    on_gpu = _backend.preference
    monkeypatch.setattr(_backend, "preference", lambda op, device_type: on_gpu(op, "cuda"))
    for op in (gpb.OP_LOSS, gpb.OP_SCORES):
        if "cuda" not in _backend._REGISTRY[op]:
            monkeypatch.setitem(
                _backend._REGISTRY[op], "cuda", _backend.Impl(lambda *a: "cuda", gpb.ALL_FLOATS, gpb._cuda_supports)
            )
    for d in (65, 96, 128):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            head = torch.empty(2, 1, 8, d, device="meta", dtype=dtype)
            assert _backend.select(gpb.OP_LOSS, head)[0] == "triton", (d, dtype)
            assert _backend.select(gpb.OP_SCORES, head)[0] == "triton", (d, dtype)
        fp64 = torch.empty(2, 1, 8, d, device="meta", dtype=torch.float64)
        assert _backend.select(gpb.OP_LOSS, fp64)[0] == "cuda"  # the Triton kernels take no float64
    wider = torch.empty(2, 1, 8, 129, device="meta", dtype=torch.bfloat16)
    assert "heads up to 128" in _backend.reasons(gpb.OP_LOSS, wider)["triton"]
    assert _backend.select(gpb.OP_LOSS, wider)[0] == "torch"  # beyond the CUDA C++ rows as well
