"""One case measured: its inputs made once, each peer built and timed, the timed peers' peak
memory, and the case's tensors freed before the next case allocates its own. Shared by the CPU
runner (bench/run.py) and the GPU one (bench/gpu/__main__.py); each turns the results into rows."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from bench._case import Case
from bench._memory import peak_bytes
from bench._timing import Clock, Plan, Timing, left_out, time_peers


def measure_case(
    case: Case,
    device: torch.device,
    clock: Clock,
    plan: Plan,
    deadline: float | None = None,
    now: Callable[[], float] = time.perf_counter,
    expected_s: dict[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, int | None]]:
    """``(results, peaks)``: per peer a :class:`Timing` or the exception that stopped it (an
    ``Unavailable`` from its build, or whatever its build or a call raised), and the peak bytes of
    each timed peer (None where the device keeps no statistics). ``deadline``: a
    ``now()`` reading by which the case should end: a peer other than the subject whose turn to be
    built or warmed up comes after it, or that ``expected_s`` says would not end before it, is left
    out (see :func:`bench._timing.left_out`)."""
    inputs = case.setup()
    fns: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for peer in case.peers:
        skipped = left_out(peer.name, case.subject, deadline, now, expected_s)
        if skipped is not None:  # building may compile: it is part of the case's time
            results[peer.name] = skipped
            continue
        try:
            fns[peer.name] = peer.build(inputs)
        except Exception as exc:  # a peer that cannot run is a result to report, not a reason to stop
            results[peer.name] = exc
    results.update(time_peers(fns, clock, plan, deadline, now, case.subject, expected_s))
    peaks = {name: peak_bytes(fn, device) for name, fn in fns.items() if isinstance(results[name], Timing)}
    del inputs, fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, peaks
