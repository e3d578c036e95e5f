"""The GlobalPointer Triton launchers: every pickable tile compiled ahead of time, RoPE applied in the
kernels from one shared table, and production sizes on a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch

from kexue.ops.global_pointer import labels_to_csr
from kexue.reference import global_pointer as ref
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def production_problem(batch, length, types, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, 1, length, d, generator=g, device="cuda").to(dtype)
    k = torch.randn(batch, 1, length, d, generator=g, device="cuda").to(dtype)
    sb = torch.randn(batch, types, length, generator=g, device="cuda").to(dtype)
    eb = torch.randn(batch, types, length, generator=g, device="cuda").to(dtype)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g, device="cuda")
    lengths[0] = length
    mask = torch.arange(length, device="cuda")[None, :] < lengths[:, None]
    n = 4 * batch * types
    b = torch.randint(0, batch, (n,), generator=g, device="cuda")
    t = torch.randint(0, types, (n,), generator=g, device="cuda")
    i = (torch.rand(n, generator=g, device="cuda") * (lengths[b] - 4)).long()
    j = (i + torch.randint(0, 4, (n,), generator=g, device="cuda")).clamp_max(lengths[b] - 1)
    return q, k, sb, eb, mask, torch.stack((b, t, i, j), -1)


@cuda
@pytest.mark.parametrize("d, dtype", [(64, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16)])
def test_production_size_on_the_gpu(d, dtype):
    """B16 L512 T16: loss and gradients of the kernels (bf16/fp16 dots on tensor cores) against the
    float64 reference, and the kernels' peak memory far below the (B, T, L, L) scores."""
    batch, length, types = 16, 512, 16
    q, k, sb, eb, mask, index = production_problem(batch, length, types, d, dtype)
    row_ptr, cols = labels_to_csr(index, batch, types, length)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, lse = K.loss_forward(q, k, sb, eb, mask, row_ptr, cols, 1, 1e4, True)
    grad = torch.rand(batch, types, device="cuda")
    grads = K.loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, lse, 1, 1e4, True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < batch * types * length * length * 2 / 8  # 1/8 of one bf16 copy of the scores
    labels = ref.dense_labels(row_ptr, cols, batch, types, length)
    args64 = [t.double() for t in (q, k, sb, eb)]
    loss64, _ = ref.global_pointer_loss_forward(*args64, mask, labels, "interleaved", 1e4, True)
    grads64 = ref.global_pointer_loss_backward(grad.double(), *args64, mask, labels, "interleaved", 1e4, True)
    assert_close(loss, loss64, dtype, "loss", 2.0)
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=False):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name, 2.0)


@cuda
def test_production_scores_on_the_gpu():
    batch, length, types, d = 16, 512, 16, 64
    q, k, sb, eb, mask, _ = production_problem(batch, length, types, d, torch.bfloat16, seed=1)
    out = K.scores_forward(q, k, sb, eb, mask, 1, 1e4, True)
    out64 = ref.global_pointer_scores(*[t.double() for t in (q, k, sb, eb)], mask, "interleaved", True, 1e4)
    assert_close(out, out64, torch.bfloat16, "scores")


def test_every_pickable_tile_is_compiled_ahead_of_time():
    """tests/gpu_compile.py checks AOT_CONFIGS (zero stack and spills, tensor cores): every tile
    the launchers can pick on each target is there, for that target, with the 16-bit entries
    demanding tensor-core dots (and wgmma for the 64-row sm_90 tiles)."""
    from kexue.triton_kernels import global_pointer_aot as aot

    shipped = {}
    for c in aot.AOT_CONFIGS:
        key = (c["kernel"].__name__, c["signature"]["q_ptr" if "q_ptr" in c["signature"] else "k_ptr"])
        consts = c["constexprs"]
        for arch in c["archs"]:
            shipped[(*key, consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_H"], c["num_warps"], arch)] = c
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for arch in aot.GPU_ARCHS:
        for dtype in ptr:
            for d in range(1, K.MAX_SERVED_HEAD + 1):
                picks = [("_gp_scores_fwd_kernel", K.scores_tile_for(d, dtype, arch))]
                if K.supports(d, dtype, "loss") is None:
                    picks.append(("_gp_loss_fwd_kernel", K.tile_for(d, dtype, arch)))
                for kernel, t in picks:
                    key = (kernel, ptr[dtype], t.block_m, t.block_n, t.block_h, t.num_warps, arch)
                    assert key in shipped, key
                    config = shipped[key]
                    assert config.get("maxnreg") == t.maxnreg and config["aligned_only"]
                    if dtype != torch.float32:
                        assert "tensor_cores" in config["expect"], key
                        assert ("wgmma" in config["expect"]) == (arch == 90 and t.block_m >= 64), key
    assert K.tile_for(128, torch.bfloat16, 90).block_m >= 64  # sm_90 takes the wgmma tile


@pytest.mark.parametrize("rope", [0, 1, 2])
def test_rope_runs_in_the_kernels(rope):
    """The launcher hands q and k to the kernels unrotated: rows of 64 channels in fp16 (the operand
    dtype) are passed as they are, with no eager rotation or copy; narrower rows are only padded
    (each half separately for rotate-half, so a channel's pair sits at c + 32)."""
    q = torch.randn(2, 1, 9, 64, dtype=torch.float16)
    assert K._rows(q, rope, 64).data_ptr() == q.data_ptr()
    narrow = torch.randn(2, 1, 9, 6, dtype=torch.float16)
    rows = K._rows(narrow, rope, 16)
    if rope == 2:
        assert torch.equal(rows[..., :3], narrow[..., :3]) and torch.equal(rows[..., 8:11], narrow[..., 3:])
        assert not rows[..., 3:8].any() and not rows[..., 11:].any()
    else:
        assert torch.equal(rows[..., :6], narrow) and not rows[..., 6:].any()
    assert torch.equal(K._unpadded(rows.float(), 6, rope, torch.float16), narrow)


def test_rope_table_is_shared_across_lengths():
    """The kernels read cos/sin per position from one cached table per (head, base, layout,
    device): lengths up to the next power of two share it; its values are the float64 angles
    rounded once, per pair for rotate-half, per channel (sin signed -, +) for the interleaved layout."""
    a = K._rope_table(33, 6, 16, 1e4, 2, torch.device("cpu"))
    assert K._rope_table(40, 6, 16, 1e4, 2, torch.device("cpu")) is a
    assert a.shape == (64, 2, 8) and a.dtype == torch.float32
    ang = torch.arange(64, dtype=torch.float64)[:, None] * 1e4 ** (-torch.arange(3, dtype=torch.float64) * 2 / 6)
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    assert torch.equal(a[:, 0, :3], cos) and torch.equal(a[:, 1, :3], sin)
    assert (a[:, 0, 3:] == 1).all() and (a[:, 1, 3:] == 0).all()  # padded pairs: identity
    b = K._rope_table(40, 6, 16, 1e4, 1, torch.device("cpu"))
    assert b is K._rope_table(64, 6, 16, 1e4, 1, torch.device("cpu")) and b.shape == (64, 2, 16)
    assert torch.equal(b[:, 0, 0:6:2], cos) and torch.equal(b[:, 0, 1:6:2], cos)
    assert torch.equal(b[:, 1, 0:6:2], -sin) and torch.equal(b[:, 1, 1:6:2], sin)
    assert (b[:, 0, 6:] == 1).all() and (b[:, 1, 6:] == 0).all()
    assert K._rope_table(65, 6, 16, 1e4, 1, torch.device("cpu")).shape[0] == 128
    assert K._rope_table(65, 6, 16, 1e4, 0, torch.device("cpu")).numel() == 0


def test_kernels_keep_their_ones_at_runtime():
    # one head (Efficient GlobalPointer), one type, tril and one-token sequences make H, T, TRIL or
    # L equal to 1; folded into constants they compile to code the static check never saw (with T
    # the constant 1, twelve float32 configurations kept stacks), so every kernel keeps them at runtime
    from kexue.triton_kernels import global_pointer_aot
    from kexue.triton_kernels.global_pointer_tile_ops import RUNTIME_INTS

    from tests.jit_specialization import assert_compiled_as_kept, runtime_ints

    kernels = {c["kernel"].fn.__name__: c["kernel"].fn.__module__ for c in global_pointer_aot.AOT_CONFIGS}
    by_module: dict[str, list[str]] = {}
    for name, module in kernels.items():
        by_module.setdefault(module, []).append(name)
    kept = runtime_ints(by_module)
    assert len(kept) == 6 and all(ints == set(RUNTIME_INTS) for ints in kept.values()), kept
    assert_compiled_as_kept(global_pointer_aot.AOT_CONFIGS, kept, RUNTIME_INTS)
