"""Out-of-range input never crashes a BioHash or entropy-normalization kernel.

Each case runs in its own Python subprocess (a kernel that reads or writes out of bounds may kill
the process with a signal instead of raising), on every backend available here (cpu, torch, and
triton under the interpreter when there is no GPU), through the paths where the public functions'
eager checks are skipped: ``torch.compile`` and the raw ``torch.ops.kexue.*`` ops. The test asserts
that the subprocess exits normally after every backend raised ValueError, and that the synapses
were left untouched by a refused learning step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import kexue
from tests.conftest import triton_unavailable_reason

# Backends that serve CPU tensors here (Triton under the interpreter when there is no GPU).
BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []

# Run by each subprocess: CASE(backend) must raise ValueError; it prints one line per backend.
PRELUDE = """
import math, sys, torch, kexue
torch._dynamo.config.suppress_errors = False
W = kexue.ops.new_synapses(40, 300, generator=torch.Generator().manual_seed(0))
Wt = W.t()  # (N, K) contiguous, what the raw ops take
ids = torch.tensor([3, 7, 11, 12])
off = torch.tensor([0, 2, 4])

def compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)

def refused(case, backend):
    before = W.clone()
    try:
        with kexue.use_backend(backend):
            case()
    except kexue.BackendUnavailableError:  # this backend does not serve the op: nothing to check
        print(backend, "n/a", flush=True)
        return
    except ValueError as e:
        assert torch.equal(W, before), "a refused call changed the synapses"
        print(backend, "ValueError", str(e).splitlines()[0][:120], flush=True)
        return
    except Exception as e:  # the wrong exception type: report it
        print(backend, type(e).__name__, str(e).splitlines()[0][:200], flush=True)
        return
    print(backend, "no error", flush=True)
"""

CASES = {
    # the reproduction: an id past N under torch.compile
    "compiled_hash_id_too_large": "compiled(lambda i, s: kexue.ops.biohash(i, None, None, s, 7))"
    "(torch.tensor([[0, 10**6]]), W)",
    "compiled_hash_id_minus_one": "compiled(lambda i, s: kexue.ops.biohash(i, None, None, s, 7))"
    "(torch.tensor([[0, -1]]), W)",
    "compiled_activations_id_too_large": "compiled(lambda i, o, s: kexue.ops.biohash_activations(i, o, None, s))"
    "(torch.tensor([1, 300]), torch.tensor([0, 2]), W)",
    "compiled_update_id_too_large": "compiled(lambda i, s: kexue.ops.biohash_update(i, None, None, s, 0.1))"
    "(torch.tensor([[5, 10**6]]), W)",
    "compiled_update_id_minus_one": "compiled(lambda i, s: kexue.ops.biohash_update(i, None, None, s, 0.1))"
    "(torch.tensor([[-1, 4]]), W)",
    "raw_hash_id_too_large": "torch.ops.kexue.biohash_sparse(torch.tensor([3, 10**9, 1, 2]), off, None, Wt, 5, True)",
    "raw_hash_id_negative": "torch.ops.kexue.biohash_sparse(torch.tensor([3, -7, 1, 2]), off, None, Wt, 5, True)",
    "raw_hash_offsets_past_nnz": "torch.ops.kexue.biohash_sparse(ids, torch.tensor([0, 2, 4000]), None, Wt, 5, True)",
    "raw_hash_offsets_decreasing": "torch.ops.kexue.biohash_sparse(ids, torch.tensor([0, 3, 1, 4]), None, Wt, 5, "
    "False)",
    "raw_hash_offsets_negative_start": "torch.ops.kexue.biohash_sparse(ids, torch.tensor([-9, 2, 4]), None, Wt, 5, "
    "True)",
    "raw_hash_k_too_large": "torch.ops.kexue.biohash_sparse(ids, off, None, Wt, 41, True)",
    "raw_hash_weights_too_short": "torch.ops.kexue.biohash_sparse(ids, off, torch.ones(2), Wt, 5, True)",
    "raw_activations_id_too_large": "torch.ops.kexue.biohash_activations(torch.tensor([3, 300, 1, 2]), off, None, Wt)",
    "raw_update_id_too_large": "torch.ops.kexue.biohash_update(torch.tensor([3, 10**6, 1, 2]), off, None, Wt, 0.1, "
    "0.0, 2, 1e-30, 0.0)",
    "raw_update_offsets_past_nnz": "torch.ops.kexue.biohash_update(ids, torch.tensor([0, 2, 99]), None, Wt, 0.1, "
    "0.0, 2, 1e-30, 0.0)",
    "raw_update_lr_inf": "torch.ops.kexue.biohash_update(ids, off, None, Wt, math.inf, 0.0, 2, 1e-30, 0.0)",
    "update_lr_inf": "kexue.ops.biohash_update(ids, off, None, W, math.inf)",
    "update_delta_nan": "kexue.ops.biohash_update(ids, off, None, W, 0.1, delta=math.nan)",
    "update_lr_nan": "kexue.ops.biohash_update(ids, off, None, W, math.nan)",
    "entropy_negative_probability": "kexue.ops.entropy_normalize(torch.tensor([[0.5, -0.25, 0.75]]), 0.5)",
}


def _script(case: str) -> str:
    body = PRELUDE + f"\nfor b in {BACKENDS!r}:\n    refused(lambda: {case}, b)\n"
    return textwrap.dedent(body)


@pytest.mark.parametrize("name", sorted(CASES))
def test_out_of_range_input_raises_value_error_not_a_signal(name):
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # conftest's setting, for the subprocess too
    proc = subprocess.run(
        [sys.executable, "-c", _script(CASES[name])], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, (
        f"{name}: the subprocess ended with {proc.returncode} (a negative code is a "
        f"signal)\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    )
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == BACKENDS, proc.stdout + proc.stderr[-3000:]
    for line in lines:
        assert line.split()[1] in ("ValueError", "n/a"), f"{name}: {line}"
    assert any(line.split()[1] == "ValueError" for line in lines), proc.stdout
