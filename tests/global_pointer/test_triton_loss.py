"""The Triton kernels of the GlobalPointer loss against the float64 oracle (TRITON_INTERPRET=1 on CPU):
matching losses, masked positives, the public op, head routing, and one Q K^T per tile.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.ops import global_pointer_loss
from kexue.ops.global_pointer import labels_to_csr
from kexue.reference import global_pointer as ref
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)

from tests.global_pointer.triton_helpers import HOPPER, ROPE_NAMES, SMALL, problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN
WIDE = K.Tile(32, 32, 128, 4)  # a 128-channel head block over 4 warps (the launcher's uses 8)


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
    with pytest.raises(kexue.BackendUnavailableError, match="not torch.float64"):
        global_pointer_loss(q3.double(), k3.double(), sbu.double(), ebu.double(), labels.nonzero(), mask)
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
    """The oracle stays an oracle: the Triton modules rotate and read labels themselves, taking
    from kexue only the RoPE angle formula's contract module (shared with the oracle)."""
    import ast
    from pathlib import Path

    modules = sorted(Path(K.__file__).parent.glob("global_pointer*.py"))
    assert len(modules) >= 6, modules  # launchers, configs, AOT list, tile helpers, two kernel files
    for path in modules:
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and m.startswith("kexue") and m != "kexue._rope"], imported


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
