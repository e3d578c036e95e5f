"""Memory: a call's peak allocation, and the machine's memory-bandwidth floor.

The floor is what an in-place ``x.add_(y)`` on tensors far larger than the caches achieves:
it reads x and y and writes x, 12 bytes per fp32 element, and an in-place write costs no
write-allocate read. A memory-bound op can at best move its bytes at that rate, so a case's
achieved bandwidth (bytes it must move / time) as a fraction of the floor says how much is left.
It is measured in the same run as the cases because it drifts with the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bench._timing import Clock, Plan, time_peers

FLOOR_BYTES_PER_ELEMENT = 12


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``fn`` beyond what was allocated before it.

    Measurable on CUDA only (the caching allocator keeps the statistics); None elsewhere.
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


def floor_elements(device: torch.device, quick: bool) -> int:
    """Tensor size for the floor: several times the last-level cache (L3 on CPU, L2 on GPU)."""
    if quick:
        return 1 << 22  # 16 MiB per tensor: a rough floor, enough for a smoke run
    return 1 << 27 if device.type == "cuda" else 1 << 25  # 512 MiB / 128 MiB per tensor


def measure_floor(device: torch.device, clock: Clock, plan: Plan, quick: bool) -> dict[str, Any]:
    """The in-place add bandwidth: ``{"gbps", "elements", "median_s", "q20_s", "q80_s"}``."""
    n = floor_elements(device, quick)
    x = torch.rand(n, device=device)
    y = torch.rand(n, device=device)
    timing = time_peers({"x.add_(y)": lambda: x.add_(y)}, clock, plan)["x.add_(y)"]
    if isinstance(timing, BaseException):
        raise timing
    moved = FLOOR_BYTES_PER_ELEMENT * n
    return {
        "op": "x.add_(y) fp32, in place",
        "elements": n,
        "bytes": moved,
        "median_s": timing.median,
        "q20_s": timing.q20,
        "q80_s": timing.q80,
        "gbps": moved / timing.median / 1e9,
    }
