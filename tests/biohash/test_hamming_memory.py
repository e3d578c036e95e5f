"""Hamming top-n streams the database: Q=64 queries against D=2M codes take a bounded amount of
memory on every backend that serves the search, and still give the exact answer.

A (Q, D) int64 key matrix would be 1 GiB here (and 8 GB at Q=1k, D=1M). Each backend runs in a
subprocess that builds the database first, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), searches, and reports the growth of the peak above the resident size
before the search. The database holds, for each query, ten planted codes at known distances (with
ties, at random indices) among random codes, which lie ~200 bits away (a random 400-bit code
within 9 bits of a query has probability ~1e-100), so the exact answer is known without a
brute-force pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import kexue
from tests.conftest import DEVICE, triton_unavailable_reason

# The Triton kernel on CPU tensors runs in the interpreter: exact but minutes long (2M codes).
BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
if triton_unavailable_reason() is None:
    BACKENDS.append(pytest.param("triton", marks=pytest.mark.slow) if DEVICE.type == "cpu" else "triton")
BUDGET_MB = 128  # a tile plus O(Q n); the key matrix alone would be 1024

SCRIPT = """
import json, torch, kexue

def rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

Q, D, NB, N = 64, 2_000_000, 50, 10
g = torch.Generator().manual_seed(0)
db = torch.randint(0, 256, (D, NB), dtype=torch.uint8, generator=g)
queries = torch.randint(0, 256, (Q, NB), dtype=torch.uint8, generator=g)
planted = torch.tensor([0, 1, 1, 2, 3, 3, 3, 5, 7, 9])  # bits flipped: the distances, with ties
where = torch.randperm(D, generator=g)[: Q * N].reshape(Q, N)
for qi in range(Q):
    for j, flips in enumerate(planted.tolist()):
        bits = torch.randperm(8 * NB, generator=g)[:flips]
        code = queries[qi].clone()
        for b in bits.tolist():
            code[b // 8] ^= 1 << (b % 8)
        db[where[qi, j]] = code
with kexue.use_backend(BACKEND):
    kexue.ops.hamming_topk(queries[:2], db[:1000], N)  # load and compile everything first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = rss_mb("VmRSS")
    dist, idx = kexue.ops.hamming_topk(queries, db, N)
    peak = rss_mb("VmHWM")
order = torch.stack([torch.tensor(sorted(zip(planted.tolist(), where[qi].tolist()))) for qi in range(Q)])
print(json.dumps(dict(growth_mb=peak - before, exact=bool(torch.equal(dist, order[..., 0])
                                                         and torch.equal(idx, order[..., 1])))))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
@pytest.mark.parametrize("backend", BACKENDS)
def test_hamming_topk_q64_d2m_runs_in_bounded_memory(backend):
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # conftest's setting, for the subprocess too
    script = f"BACKEND = {backend!r}\n" + textwrap.dedent(SCRIPT)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["exact"], f"{backend}: wrong neighbours"
    assert result["growth_mb"] < BUDGET_MB, f"{backend}: peak memory grew by {result['growth_mb']:.0f} MB"
