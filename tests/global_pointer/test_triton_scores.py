"""The Triton kernel of the dense GlobalPointer scores op against the float64 oracle, eager and
through the public op and opcheck.
"""

from __future__ import annotations

import pytest
import torch

from kexue.ops import global_pointer_scores
from kexue.reference import global_pointer as ref
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)

from tests.global_pointer.triton_helpers import HOPPER, ROPE_NAMES, SMALL, problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


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
