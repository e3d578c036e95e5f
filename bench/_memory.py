"""Memory: a call's peak allocation, and the machine's memory-bandwidth floor.

The floor is what an in-place ``x.add_(y)`` on tensors far larger than the caches achieves:
it reads x and y and writes x, 12 bytes per fp32 element, and an in-place write costs no
write-allocate read. A memory-bound op can at best move its bytes at that rate, so a case's
achieved bandwidth (bytes it must move / time) as a fraction of the floor says how much is left.
It is measured in the same run as the cases because it drifts with the machine's load, and from
the fastest of many samples: other jobs can only slow a sample down, so the fastest is the one
closest to what the memory system itself allows (a median taken while another job ran made the
floor look slow and cases reach 197% of it).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench._timing import Clock, Plan, time_peers

FLOOR_BYTES_PER_ELEMENT = 12
FLOOR_RUNS = 15  # samples of the floor (each one at least the plan's run_s long)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``fn`` beyond what was allocated before it.

    Measurable on CUDA only (the caching allocator keeps the statistics); None elsewhere, and the
    table then has no peak-memory column.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated(device) - before


# ---------------------------------------------------------------------------------------------
# Peak memory on CPU. The allocator keeps no statistics there, so a call's peak is read from the
# process's peak resident set, in a fresh subprocess per measurement (an earlier, larger call would
# hide it), with glibc's mmap threshold pinned low so that freed buffers really leave the process.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(fn: Callable[[], Any]) -> int:
    """Growth of the peak resident set over one call of ``fn`` (after a warm-up call); -1 when the
    call stayed below an earlier high-water mark, i.e. when there is nothing to measure."""
    import resource

    fn()
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = fn()
    del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return -1 if peak <= peak_before else peak - before


def peak_bytes_cpu(module: str, args: Sequence[str]) -> int | None:
    """Runs ``python -m <module> --peak <args>`` (which prints :func:`rss_growth` of one call) in a
    fresh process; the bytes, or None when it failed or measured nothing."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-m", module, "--peak", *map(str, args)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    value = int(res.stdout.strip().splitlines()[-1])
    return None if value < 0 else value


def mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def floor_elements(device: torch.device, quick: bool) -> int:
    """Tensor size for the floor: several times the last-level cache (L3 on CPU, L2 on GPU)."""
    if quick:
        return 1 << 22  # 16 MiB per tensor: a rough floor, enough for a smoke run
    return 1 << 27 if device.type == "cuda" else 1 << 25  # 512 MiB / 128 MiB per tensor


def measure_floor(device: torch.device, clock: Clock, plan: Plan, quick: bool) -> dict[str, Any]:
    """The in-place add bandwidth of the fastest sample:
    ``{"gbps", "elements", "best_s", "median_s", "q20_s", "q80_s", "runs"}``."""
    n = floor_elements(device, quick)
    x = torch.rand(n, device=device)
    y = torch.rand(n, device=device)
    runs = max(plan.min_runs, FLOOR_RUNS if not quick else plan.max_runs)
    floor_plan = dataclasses.replace(plan, min_runs=runs, max_runs=runs)
    timing = time_peers({"x.add_(y)": lambda: x.add_(y)}, clock, floor_plan)["x.add_(y)"]
    if isinstance(timing, BaseException):
        raise timing
    moved = FLOOR_BYTES_PER_ELEMENT * n
    best = min(timing.samples)
    return {
        "op": "x.add_(y) fp32, in place",
        "elements": n,
        "bytes": moved,
        "runs": len(timing.samples),
        "best_s": best,
        "median_s": timing.median,
        "q20_s": timing.q20,
        "q80_s": timing.q80,
        "gbps": moved / best / 1e9,
    }
