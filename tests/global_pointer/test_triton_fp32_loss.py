"""The float32 GlobalPointer loss on the Triton backend (TRITON_INTERPRET=1 on CPU), through the
public op with sparse labels and the launcher's own tiles (32 x 32 x 64 and 32 x 32 x 128), against
the float64 oracle at the tiles' edges; and what ``allow_tf32`` does to it.

TF32 under the interpreter: the launcher passes ``input_precision="tf32"`` to the dots when
``torch.backends.cuda.matmul.allow_tf32`` is set (as torch.matmul does), but the interpreter
multiplies in full float32 whatever the precision says (triton 3.x ``create_dot`` ignores it), and
the GlobalPointer kernels have no TF32 emulation of their own (log-n attention's have one). So on
CPU the flag changes the precision the dots ask for, not the results: both are tested here; the
TF32 arithmetic itself is checked only on a GPU (tests/gpu_compile.py demands ``.tf32`` MMAs in the
compiled TF32 configurations).
"""

from __future__ import annotations

import pytest
import torch

from kexue.ops import global_pointer_loss
from kexue.reference import global_pointer as ref
from tests.global_pointer.helpers import canonical64, make_problem
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN

LENGTHS = [1, 31, 32, 33, 65]  # one token, a tile edge -1 / 0 / +1, two tiles and one
# (head size, RoPE layout): 64 and 128 fill their head blocks, 65 takes the 128 block padded (and
# no RoPE: it needs an even head)
HEADS = [(64, None), (64, "interleaved"), (65, None), (128, "half"), (128, "interleaved")]


def _run(q, k, sb, eb, labels, mask, rope):
    """Loss (sum over (b, t)) and the gradients of the public op, on the current backend."""
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    loss = global_pointer_loss(*leaves, labels.nonzero(), mask, rope=rope or False, reduction="sum")
    return loss, torch.autograd.grad(loss, leaves)


def _oracle(q, k, sb, eb, labels, mask, rope):
    args64 = canonical64(q, k, sb, eb)
    loss64, _ = ref.global_pointer_loss_forward(*args64, mask, labels, rope, 1e4, True)
    ones = torch.ones_like(loss64)
    dq, dk, dsb, deb = ref.global_pointer_loss_backward(ones, *args64, mask, labels, rope, 1e4, True)
    back = (lambda g: g[:, 0]) if q.dim() == 3 else (lambda g: g.transpose(1, 2))
    return loss64.sum(), (back(dq), back(dk), dsb.transpose(1, 2), deb.transpose(1, 2))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"d{h[0]}-{h[1]}")
def test_fp32_loss_matches_oracle_at_tile_edges(triton_backend, length, head):
    d, rope = head
    shared = (length + d) % 2 == 0  # shared and per-type q/k alternate over the cases
    q, k, sb, eb, mask, labels = make_problem(
        2, length, 2, d, shared=shared, dtype=torch.float32, density=0.2, seed=length * 7 + d
    )
    assert K.supports(d, torch.float32, "loss") is None
    loss, grads = _run(q, k, sb, eb, labels, mask, rope)
    loss64, grads64 = _oracle(q, k, sb, eb, labels, mask, rope)
    assert loss.dtype == torch.float32
    assert_close(loss, loss64, torch.float32, "loss")
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_close(a, b, torch.float32, name)


@pytest.fixture
def allow_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    yield lambda flag: setattr(torch.backends.cuda.matmul, "allow_tf32", flag)
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def dot_precisions(monkeypatch):
    """The ``input_precision`` of every ``tl.dot`` the interpreter runs, by name."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    names = {v: k for k, v in ir.INPUT_PRECISION.__members__.items()}
    seen = []
    original = interpreter.InterpreterBuilder.create_dot

    def recording(self, a, b, d, input_precision, *args, **kwargs):
        seen.append(names.get(input_precision, input_precision))
        return original(self, a, b, d, input_precision, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", recording)
    return seen


def test_allow_tf32_asks_for_tf32_dots_which_the_interpreter_runs_in_fp32(triton_backend, allow_tf32, dot_precisions):
    q, k, sb, eb, mask, labels = make_problem(2, 33, 3, 64, dtype=torch.float32, density=0.2, seed=5)
    results = {}
    for flag in (False, True):
        allow_tf32(flag)
        dot_precisions.clear()
        results[flag] = _run(q, k, sb, eb, labels, mask, "interleaved")
        assert dot_precisions and set(dot_precisions) == {"TF32" if flag else "IEEE"}, (flag, set(dot_precisions))
        # 16-bit operands ignore the flag: their dots read the input dtype
        dot_precisions.clear()
        _run(*(t.half() for t in (q, k, sb, eb)), labels, mask, "interleaved")
        assert set(dot_precisions) == {"IEEE"}
    (loss_ieee, grads_ieee), (loss_tf32, grads_tf32) = results[False], results[True]
    assert torch.equal(loss_ieee, loss_tf32)  # no TF32 rounding in the interpreter
    assert all(torch.equal(a, b) for a, b in zip(grads_ieee, grads_tf32, strict=True))
    loss64, _ = _oracle(q, k, sb, eb, labels, mask, "interleaved")
    assert_close(loss_tf32, loss64, torch.float32, "loss")  # IEEE-accurate, as the interpreter runs it
