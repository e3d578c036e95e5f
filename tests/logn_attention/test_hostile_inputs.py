"""Log-n attention on hostile input, every backend, eager and compiled: NaN in a padded key or value
never reaches the output, and the raw custom ops refuse bad input with an exception, never a crash
or a signal (offsets the caller vouches for are clamped into range).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kexue
from kexue.reference import logn_attention as ref
from tests.helpers import assert_close
from tests.logn_attention.helpers import BACKENDS, _filled

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


# Compiled, every backend goes through the same op body: one backend by default, all under -m slow.
NAN_CASES = [(b, False) for b in BACKENDS] + [
    (b, True) if i == 0 else pytest.param(b, True, marks=pytest.mark.slow) for i, b in enumerate(BACKENDS)
]


@pytest.mark.parametrize("backend,compiled", NAN_CASES)
def test_nan_in_padded_keys_does_not_reach_the_output(backend, compiled):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[0, :, 3], v_nan[0, :, 4] = math.nan, math.inf

    def f(q, k, v, mask):
        return kexue.ops.logn_attention(q, k, v, key_padding_mask=mask, return_lse=True)

    run = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    with kexue.use_backend(backend):
        out, lse = run(q, k_nan, v_nan, mask)
    want, want_lse = ref.logn_attention(
        q.double(),
        _filled(k, mask, 0.0).double(),
        _filled(v, mask, 0.0).double(),
        key_padding_mask=mask,
        return_lse=True,
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, want, torch.float32)
    assert_close(lse, want_lse, torch.float32)


PRELUDE = """
import torch, kexue
torch._dynamo.config.suppress_errors = False
ops = torch.ops.kexue
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
rule = (False, 0.3, 512.0, True, False, 1.0, False)
out, lse = kexue.ops.logn_attention(q, k, v, return_lse=True)
pq, pk = torch.randn(5, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
cq, ck = torch.tensor([0, 3, 5]), torch.tensor([0, 2, 6])
pout, plse = kexue.ops.logn_attention(pq, pk, pk, cu_seqlens=cq, cu_seqlens_k=ck, return_lse=True)

def compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)

def outcome(case, backend):
    try:
        with kexue.use_backend(backend):
            case()
    except kexue.BackendUnavailableError:
        return "n/a"
    except (ValueError, TypeError) as e:
        return type(e).__name__
    except Exception as e:  # noqa: BLE001  (reported: the wrong type)
        return type(e).__name__ + ":" + str(e).splitlines()[0][:100].replace(" ", "_")
    return "no_error"
"""


CASES = {
    "mask_too_short": "ops.logn_attention(q, k, v, torch.zeros(1, 3, dtype=torch.bool), *rule)",
    "mask_not_bool": "ops.logn_attention(q, k, v, torch.zeros(1, 5, dtype=torch.uint8), *rule)",
    "heads_not_a_multiple": "ops.logn_attention(torch.randn(1, 3, 5, 8), k, v, None, *rule)",
    "v_shorter_than_k": "ops.logn_attention(q, k, v[:, :, :2].contiguous(), None, *rule)",
    "batch_mismatch": "ops.logn_attention(q, k.expand(2, 2, 5, 8).contiguous(), v.expand(2, 2, 5, 8).contiguous(), "
    "None, *rule)",
    "head_dim_mismatch": "ops.logn_attention(q, k[..., :4].contiguous(), v[..., :4].contiguous(), None, *rule)",
    "non_contiguous": "ops.logn_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, *rule)",
    "mixed_dtypes": "ops.logn_attention(q, k.double(), v, None, *rule)",
    "three_d": "ops.logn_attention(q, k, v[0], None, *rule)",
    "scale_nan": "ops.logn_attention(q, k, v, None, False, float('nan'), 512.0, True, False, 1.0, False)",
    "train_len_one": "ops.logn_attention(q, k, v, None, False, 0.3, 1.0, True, False, 1.0, False)",
    "backward_lse_short": "ops.logn_attention_backward(out, None, q, k, v, out, lse[:, :, :2].contiguous(), None, "
    "*rule)",
    "backward_grad_out_short": "ops.logn_attention_backward(out[:, :, :2].contiguous(), None, q, k, v, out, lse, "
    "None, *rule)",
    "backward_grad_lse_short": "ops.logn_attention_backward(out, lse[:, :1].contiguous(), q, k, v, out, lse, None, "
    "*rule)",
    "backward_mask_short": "ops.logn_attention_backward(out, None, q, k, v, out, lse, "
    "torch.zeros(1, 2, dtype=torch.bool), *rule)",
    "varlen_offset_past_the_end": "ops.logn_attention_varlen(pq, pk, pk, cq, torch.tensor([0, 3, 100]), None, *rule)",
    "varlen_offset_past_the_end_with_max": "ops.logn_attention_varlen(pq, pk, pk, cq, torch.tensor([0, 3, 100]), 4, "
    "*rule)",
    "varlen_offsets_decreasing": "ops.logn_attention_varlen(pq, pk, pk, torch.tensor([0, 4, 2, 5]), "
    "torch.tensor([0, 2, 3, 6]), None, *rule)",
    "varlen_negative_start": "ops.logn_attention_varlen(pq, pk, pk, torch.tensor([-3, 3, 5]), ck, 9, *rule)",
    "varlen_max_seqlen_too_small": "ops.logn_attention_varlen(pq, pk, pk, cq, ck, 1, *rule)",
    "varlen_float_offsets": "ops.logn_attention_varlen(pq, pk, pk, cq.float(), ck, None, *rule)",
    "varlen_offsets_count_differ": "ops.logn_attention_varlen(pq, pk, pk, cq, torch.tensor([0, 6]), None, *rule)",
    "varlen_backward_bad_offsets": "ops.logn_attention_varlen_backward(pout, None, pq, pk, pk, pout, plse, cq, "
    "torch.tensor([0, 50, 6]), 3, *rule)",
    "varlen_backward_lse_short": "ops.logn_attention_varlen_backward(pout, None, pq, pk, pk, pout, "
    "plse[:, :2].contiguous(), cq, ck, None, *rule)",
    "compiled_mask_too_short": "compiled(lambda q, k, v, m: ops.logn_attention(q, k, v, m, *rule))"
    "(q, k, v, torch.zeros(1, 2, dtype=torch.bool))",
    "compiled_varlen_offset_past_the_end": "compiled(lambda q, k, c: kexue.ops.logn_attention(q, k, k, "
    "cu_seqlens=c))(pk, pk, torch.tensor([0, 3, 60]))",
    "compiled_varlen_max_seqlen_too_small": "compiled(lambda q, k, c: kexue.ops.logn_attention(q, k, k, "
    "cu_seqlens=c, max_seqlen=1))(pk, pk, torch.tensor([0, 3, 6]))",
}


def _bad_input_script(names) -> str:
    cases = ", ".join(f"{n!r}: lambda: {CASES[n]}" for n in names)
    lines = [PRELUDE, f"for name, case in {{{cases}}}.items():"]
    lines.append(f"    print(name, *(outcome(case, b) for b in {BACKENDS!r}), flush=True)")
    return textwrap.dedent("\n".join(lines))


def _assert_refused(stdout: str, names) -> None:
    seen = {}
    for line in stdout.strip().splitlines():
        name, *outcomes = line.split()
        seen[name] = outcomes
    assert sorted(seen) == sorted(names), stdout
    for name, outcomes in seen.items():
        assert len(outcomes) == len(BACKENDS), (name, outcomes)
        for backend, outcome in zip(BACKENDS, outcomes, strict=True):
            assert outcome in ("ValueError", "TypeError"), f"{name} on {backend}: {outcome}"


def test_raw_ops_refuse_bad_input(capsys):
    """The raw cases in this process (the checks run before any kernel; the subprocess test below
    is the one that would survive a crash)."""
    names = [n for n in CASES if not n.startswith("compiled")]
    exec(_bad_input_script(names), {})  # noqa: S102  (the same script as the subprocess's)
    _assert_refused(capsys.readouterr().out, names)


@pytest.mark.slow
def test_raw_ops_and_compiled_graphs_refuse_bad_input_without_a_signal():
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # conftest's setting, for the subprocess too
    proc = subprocess.run(
        [sys.executable, "-c", _bad_input_script(CASES)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, (
        f"the subprocess ended with {proc.returncode} (a negative code is a signal)\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    )
    _assert_refused(proc.stdout, CASES)


def test_trusted_offsets_are_clamped_into_range():
    """With max_seqlen on CUDA the op trusts the offsets without reading them; it clamps them on
    the device instead, so wrong ones select wrong rows but never rows past the end. (The path
    itself needs CUDA; the clamp is checked here on CPU tensors.)"""
    inputs_mod = sys.modules["kexue.ops._logn_attention_inputs"]
    for dtype in (torch.int32, torch.int64):
        cu = torch.tensor([-4, 3, 100, 2, 6], dtype=dtype)
        clamped = inputs_mod._clamped_offsets(cu, 6)
        assert clamped.dtype == dtype and clamped.tolist() == [0, 3, 6, 6, 6]
