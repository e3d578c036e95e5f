"""The Triton kernels of the GlobalPointer loss and scores op against the float64 reference.

Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1): small shapes with lengths that are not multiples of the tile, padding, one
token, shared and per-type heads, every RoPE layout, with and without the tril mask, dense and
sparse labels, fp32/bf16/fp16, through the launchers and through the public op (the triton backend);
the FLOP structure (one Q K^T per (batch, tile) whatever the number of types) by counting the dots
the interpreter runs. At the end, CUDA-only checks at production size (skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.ops import global_pointer_loss, global_pointer_scores
from kexue.ops.global_pointer import labels_to_csr
from kexue.reference import global_pointer as ref
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)

SMALL = K.Tile(16, 16, 16, 4)
WIDE = K.Tile(32, 32, 128, 4)  # a 128-channel head block over 4 warps (the launcher's uses 8)
HOPPER = K.tile_for(128, torch.bfloat16, arch=90)  # sm_90's 64 x 64 wgmma tile, run here too
ROPE_NAMES = {0: None, 1: "interleaved", 2: "half"}


pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


def problem(batch, heads, types, length, d, dtype, tril, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, heads, length, d, generator=g, dtype=torch.float64).to(dtype)
    sb = torch.randn(batch, types, length, generator=g, dtype=torch.float64).to(dtype)
    eb = torch.randn(batch, types, length, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if length > 2:
        mask[-1, length - length // 3 :] = False
    ok = ref.span_mask(mask, batch, length, tril, "cpu").expand(batch, types, length, length)
    labels = (torch.rand(batch, types, length, length, generator=g) < 0.1) & ok
    return q, k, sb, eb, mask, labels


# (B, H, T, L, d, rope, tril, tile)
CASES = [
    (2, 1, 3, 37, 8, 1, True, SMALL),
    (2, 2, 2, 20, 6, 2, False, SMALL),
    (1, 1, 2, 1, 4, 1, True, SMALL),
    (2, 1, 2, 33, 5, 0, True, SMALL),  # odd head size without RoPE
    (1, 1, 2, 70, 8, 1, True, None),  # the launcher's own tile (32 x 32 x 64)
    (1, 1, 2, 40, 72, 1, True, WIDE),  # a head wider than 64: the 128-channel head block
    # the launcher's 128-channel tile (32 x 32 x 128): 65 / 96 / 128 channels, L one past a tile
    # edge or exactly one tile; sm_90's 64 x 64 tile, L one past its edge
    (1, 1, 2, 33, 65, 0, True, None),  # odd: no RoPE (it needs an even head)
    (2, 2, 2, 32, 96, 2, False, None),
    (1, 1, 3, 33, 128, 1, True, None),
    (1, 1, 2, 65, 128, 2, True, HOPPER),
]


def csr(labels):
    batch, types, length = labels.shape[:3]
    return labels_to_csr(labels, batch, types, length)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_matches_oracle(case, dtype):
    batch, heads, types, length, d, rope, tril, tile = case
    q, k, sb, eb, mask, labels = problem(batch, heads, types, length, d, dtype, tril, seed=length + d)
    row_ptr, cols = csr(labels)
    if tile is None and K.supports(d, dtype) is not None:  # fp32: the launcher's own tiles decline it
        with pytest.raises(ValueError, match="serves fp16/bf16"):
            K.loss_forward(q, k, sb, eb, mask, row_ptr, cols, rope, 1e4, tril)
        tile = K.tile_for(d, torch.bfloat16)  # the kernels themselves still take fp32 operands
    loss, lse = K.loss_forward(q, k, sb, eb, mask, row_ptr, cols, rope, 1e4, tril, tile=tile)
    args64 = [t.double() for t in (q, k, sb, eb)]
    loss64, lse64 = ref.global_pointer_loss_forward(*args64, mask, labels, ROPE_NAMES[rope], 1e4, tril)
    assert loss.dtype == torch.float32
    # fp16/bf16 inputs: the dots read the rotated rows rounded to the input dtype (tensor cores),
    # so the loss carries that dtype's rounding, accumulated in fp32
    assert_close(loss, loss64, dtype, "loss")
    assert_close(lse, lse64, dtype, "lse")
    grad = torch.rand(batch, types, generator=torch.Generator().manual_seed(1))
    grads = K.loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, lse, rope, 1e4, tril, tile=tile)
    grads64 = ref.global_pointer_loss_backward(grad.double(), *args64, mask, labels, ROPE_NAMES[rope], 1e4, tril)
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=False):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name)


def test_masked_positive_makes_the_loss_infinite():
    q, k, sb, eb, mask, labels = problem(2, 1, 2, 21, 8, torch.float32, True, seed=3)
    bad = labels.clone()
    bad[1, 0, 5, 2] = True  # start > end: below the diagonal
    bad[0, 1, 3, 3] = False
    loss, _ = K.loss_forward(q, k, sb, eb, mask, *csr(bad), 1, 1e4, True, tile=SMALL)
    assert loss[1, 0] == float("inf") and torch.isfinite(loss[0]).all() and torch.isfinite(loss[1, 1])
    padded = labels.clone()
    padded[1, 1, 3, 20] = True  # the end is a padded token
    loss, _ = K.loss_forward(q, k, sb, eb, mask, *csr(padded), 1, 1e4, True, tile=SMALL)
    assert loss[1, 1] == float("inf") and torch.isfinite(loss[0]).all() and torch.isfinite(loss[1, 0])


def test_public_op_on_the_triton_backend(triton_backend):
    q, k, sb, eb, mask, labels = problem(2, 1, 3, 19, 8, torch.float16, True, seed=4)
    q3, k3 = q[:, 0].clone().requires_grad_(), k[:, 0].clone().requires_grad_()
    sbu, ebu = sb.transpose(1, 2).clone().requires_grad_(), eb.transpose(1, 2).clone().requires_grad_()
    loss = global_pointer_loss(q3, k3, sbu, ebu, labels.nonzero(), mask, reduction="sum")
    grads = torch.autograd.grad(loss, (q3, k3, sbu, ebu))
    args64 = [t.double() for t in (q, k, sb, eb)]
    loss64, _ = ref.global_pointer_loss_forward(*args64, mask, labels, "interleaved", 1e4, True)
    assert_close(loss, loss64.sum(), torch.float16, "loss")
    grads64 = ref.global_pointer_loss_backward(
        torch.ones(2, 3, dtype=torch.float64), *args64, mask, labels, "interleaved", 1e4, True
    )
    expected = (grads64[0][:, 0], grads64[1][:, 0], grads64[2].transpose(1, 2), grads64[3].transpose(1, 2))
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, expected, strict=False):
        assert_close(a, b, torch.float16, name, factor=2.0)  # the loss's gradient, rounded to fp16
    with pytest.raises(kexue.BackendUnavailableError, match="serves fp16/bf16"):  # fp32: declined
        global_pointer_loss(q3.float(), k3.float(), sbu.float(), ebu.float(), labels.nonzero(), mask)
    with pytest.raises(ValueError, match=r"labels\[0, 1\]"):
        bad = labels.clone()
        bad[0, 1, 4, 2] = True
        global_pointer_loss(q3, k3, sbu, ebu, bad, mask)


def test_heads_beyond_the_tiles_go_to_the_reference(triton_backend):
    """The dispatcher asks the Triton backend what it serves: a head wider than MAX_SERVED_HEAD is
    declined with a reason, and the call goes to the next backend (the reference, on CPU)."""
    from kexue import _backend

    d = K.MAX_SERVED_HEAD + 2
    q, k, sb, eb, mask, labels = problem(1, 1, 2, 9, d, torch.float32, True, seed=5)
    with pytest.raises(ValueError, match="heads up to"):
        K.loss_forward(q, k, sb, eb, mask, *csr(labels), 1, 1e4, True)
    assert "heads up to" in _backend.reasons("global_pointer_loss", q)["triton"]
    with pytest.raises(_backend.BackendUnavailableError, match="triton: Triton GlobalPointer tiles hold heads"):
        _backend.select("global_pointer_loss", q)  # forced triton (the fixture) cannot serve it
    with kexue.use_backend(None):
        name, _ = _backend.select("global_pointer_loss", q)
    assert name in ("cpu", "torch")


def test_kernels_import_nothing_from_the_reference():
    """The oracle stays an oracle: the Triton modules compute RoPE and read labels themselves."""
    import ast
    from pathlib import Path

    modules = sorted(Path(K.__file__).parent.glob("global_pointer*.py"))
    assert len(modules) >= 6, modules  # launchers, configs, AOT list, tile helpers, two kernel files
    for path in modules:
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and m.startswith("kexue")], imported


# ---------------------------------------------------------------------------------------------
# FLOP structure: one Q K^T per (batch, tile), whatever the number of types.


@pytest.fixture
def dot_counter(monkeypatch):
    """Counts the ``tl.dot`` calls the interpreter executes (all programs of every launch)."""
    if not torch.cuda.is_available():
        from triton.runtime import interpreter
    else:
        pytest.skip("counts the dots the Triton interpreter runs (CPU tensors)")
    calls = []
    original = interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, *args, **kwargs):
        calls.append((tuple(a.data.shape), tuple(b.data.shape)))
        return original(self, a, b, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    return calls


def expected_dots(length, tile, tril, batch):
    """Tiles the loss forward visits per batch element: (row block, column tile) pairs, only
    those on or above the diagonal with tril."""
    n = -(-length // tile.block_m)
    if not tril:
        return batch * n * n
    return batch * sum(n - (m * tile.block_m) // tile.block_n for m in range(n))


@pytest.mark.parametrize("tril", [True, False])
def test_shared_head_computes_each_tile_once_for_all_types(dot_counter, tril):
    """Shared q/k (H = 1): the loss forward runs exactly one dot per (batch, tile) and each
    backward pass one Q K^T plus one gradient product per (batch, tile), for T = 1 and T = 7
    alike (before, every type recomputed the tile: T-fold)."""
    batch, length, d = 2, 37, 8
    counts = {}
    for types in (1, 7):
        q, k, sb, eb, mask, labels = problem(batch, 1, types, length, d, torch.float32, tril, seed=11)
        row_ptr, cols = csr(labels)
        dot_counter.clear()
        _, lse = K.loss_forward(q, k, sb, eb, mask, row_ptr, cols, 1, 1e4, tril, tile=SMALL)
        fwd = len(dot_counter)
        dot_counter.clear()
        K.loss_backward(torch.rand(batch, types), q, k, sb, eb, mask, row_ptr, cols, lse, 1, 1e4, tril, tile=SMALL)
        bwd = len(dot_counter)
        dot_counter.clear()
        K.scores_backward(torch.randn(batch, types, length, length), q, k, sb, eb, mask, 1, 1e4, tril, tile=SMALL)
        counts[types] = (fwd, bwd, len(dot_counter))
    tiles = expected_dots(length, SMALL, tril, batch)
    assert counts[1] == counts[7] == (tiles, 4 * tiles, 2 * tiles)


# ---------------------------------------------------------------------------------------------
# The dense scores op.

# (B, H, T, L, d, rope, tril, masked, tile)
SCORE_CASES = [
    (2, 1, 3, 21, 8, 1, True, True, SMALL),  # shared head, odd L (two 16-tiles, the second partial)
    (2, 2, 2, 17, 6, 2, False, True, SMALL),  # one head per type, rotate_half, no tril
    (1, 1, 1, 1, 4, 1, True, False, SMALL),  # one token
    (2, 3, 3, 18, 5, 0, True, False, SMALL),  # odd head size without RoPE, no padding
    (1, 1, 2, 35, 8, 1, True, True, None),  # the launcher's own tile (16 x 32 x 64)
    (1, 1, 2, 33, 65, 0, True, True, None),  # 128-channel tiles (32 x 32 x 128): L past an edge
    (2, 2, 2, 32, 96, 2, False, True, None),
    (1, 1, 2, 33, 128, 1, True, False, None),
    (1, 1, 2, 65, 128, 2, True, True, HOPPER),  # sm_90's 64 x 64 tile
]


@pytest.mark.parametrize("case", SCORE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_match_oracle(case, dtype):
    batch, heads, types, length, d, rope, tril, masked, tile = case
    q, k, sb, eb, mask, _ = problem(batch, heads, types, length, d, dtype, tril, seed=length * 7 + d)
    if not masked:
        mask = torch.ones_like(mask)
    out = K.scores_forward(q, k, sb, eb, mask, rope, 1e4, tril, tile=tile)
    args64 = [t.double() for t in (q, k, sb, eb)]
    out64 = ref.global_pointer_scores(*args64, mask, ROPE_NAMES[rope], tril, 1e4)
    assert out.dtype == dtype and out.shape == (batch, types, length, length)
    # -inf exactly where the reference masks (checked by rel_err), finite elsewhere
    assert torch.isfinite(out[torch.isfinite(out64)]).all()
    assert_close(out, out64, dtype, "scores")
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(batch, types, length, length, generator=g, dtype=torch.float64).to(dtype)
    grads = K.scores_backward(grad, q, k, sb, eb, mask, rope, 1e4, tril, tile=tile)
    grads64 = ref.global_pointer_scores_backward(grad.double(), *args64, mask, ROPE_NAMES[rope], 1e4, tril)
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=False):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name)


def test_scores_ignore_the_gradient_of_masked_spans():
    """dScores at masked spans (below the diagonal, padding) never reaches the inputs, even if it
    is NaN: those scores are the constant -inf."""
    q, k, sb, eb, mask, _ = problem(2, 1, 2, 19, 8, torch.float32, True, seed=6)
    ok = ref.span_mask(mask, 2, 19, True, "cpu").expand(2, 2, 19, 19)
    grad = torch.randn(2, 2, 19, 19, generator=torch.Generator().manual_seed(3))
    clean = K.scores_backward(grad, q, k, sb, eb, mask, 1, 1e4, True, tile=SMALL)
    dirty = K.scores_backward(grad.masked_fill(~ok, float("nan")), q, k, sb, eb, mask, 1, 1e4, True, tile=SMALL)
    for a, b in zip(clean, dirty, strict=False):
        assert torch.equal(a, b)


def test_public_scores_op_on_the_triton_backend(triton_backend):
    q, k, sb, eb, mask, _ = problem(2, 2, 2, 13, 8, torch.float32, True, seed=7)
    qu, ku = q.transpose(1, 2).clone().requires_grad_(), k.transpose(1, 2).clone().requires_grad_()
    sbu, ebu = sb.transpose(1, 2).clone().requires_grad_(), eb.transpose(1, 2).clone().requires_grad_()
    out = global_pointer_scores(qu, ku, sbu, ebu, mask, rope="half", tril_mask=False)
    args64 = [t.double() for t in (q, k, sb, eb)]
    assert_close(out, ref.global_pointer_scores(*args64, mask, "half", False, 1e4), torch.float32, "scores")
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(out.masked_fill(torch.isinf(out), 0.0).mul(weight).sum(), (qu, ku, sbu, ebu))
    grads64 = ref.global_pointer_scores_backward(weight.double(), *args64, mask, "half", 1e4, False)
    expected = (
        grads64[0].transpose(1, 2),
        grads64[1].transpose(1, 2),
        grads64[2].transpose(1, 2),
        grads64[3].transpose(1, 2),
    )
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, expected, strict=False):
        assert_close(a, b, torch.float32, name)


def test_scores_opcheck_on_the_triton_backend(triton_backend):
    q, k, sb, eb, mask, _ = problem(1, 1, 2, 5, 4, torch.float32, True, seed=8)
    leaves = [t.requires_grad_() for t in (q, k, sb, eb)]
    torch.library.opcheck(torch.ops.kexue.global_pointer_scores, (*leaves, mask, 1, 1e4, True))


# ---------------------------------------------------------------------------------------------
# CUDA only: production size (B16 L512 T16 d64 bf16, the case) and a 128-channel head.

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
    """The kernels read cos/sin per position from one cached table per (head, base, device):
    lengths up to the next power of two share it; its values are the float64 angles rounded once."""
    a = K._rope_table(33, 6, 16, 1e4, 1, torch.device("cpu"))
    assert K._rope_table(40, 6, 16, 1e4, 2, torch.device("cpu")) is a
    assert a.shape == (64, 2, 8) and a.dtype == torch.float32
    ang = torch.arange(64, dtype=torch.float64)[:, None] * 1e4 ** (-torch.arange(3, dtype=torch.float64) * 2 / 6)
    assert torch.equal(a[:, 0, :3], torch.cos(ang).float()) and torch.equal(a[:, 1, :3], torch.sin(ang).float())
    assert (a[:, 0, 3:] == 1).all() and (a[:, 1, 3:] == 0).all()  # padded pairs: identity
    assert K._rope_table(65, 6, 16, 1e4, 1, torch.device("cpu")).shape[0] == 128
    assert K._rope_table(65, 6, 16, 1e4, 0, torch.device("cpu")).numel() == 0
