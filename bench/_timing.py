"""Timing peers against each other in one process: warm-up apart, alternating rounds, quantiles.

Absolute times on a shared machine drift (other jobs, frequency changes), so peers are timed in
rounds that visit every peer once, in an order rotated each round; a slow minute then hurts all
peers alike and their ratio stays meaningful. Each sample is the mean over enough back-to-back
calls to last ``run_s`` (timer resolution and launch jitter average out); the result is the
median of the samples with their 20% and 80% quantiles.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench._case import Skipped

# Why a peer is left out when its case has used up its share of the run's time budget.
LATE = "left out: its case's share of the run's time budget was spent before its turn (--budget S or --full to time it)"


def left_out(
    name: str,
    keep: str | None,
    deadline: float | None,
    now: Callable[[], float],
    expected_s: dict[str, float] | None = None,
) -> Skipped | None:
    """Why peer ``name`` is not to be built or warmed up now, or None: its case's ``deadline``
    has passed, or ``expected_s[name]`` (what earlier runs say its first call and fewest samples
    take) would end past it. ``keep`` (the case's subject) is never left out."""
    if deadline is None or name == keep:
        return None
    left = deadline - now()
    if left <= 0:
        return Skipped(LATE)
    need = (expected_s or {}).get(name, 0.0)
    if need > left:
        return Skipped(
            f"left out: earlier runs say its first call, warm-up and fewest samples take {need:.0f} s, more than "
            f"the {left:.0f} s its case has left of the run's time budget (--budget S or --full to time it)"
        )
    return None


@dataclass(frozen=True)
class Plan:
    """How long to time each peer. ``--quick`` uses a smaller plan."""

    warmup_s: float = 1.0  # calls after the first (which pays for compilation and lazy set-up): at least one
    run_s: float = 0.2  # each sample lasts at least this long
    min_runs: int = 3  # the slowest peers (the eager reference) get only this many
    max_runs: int = 15
    budget_s: float = 10.0  # time per peer per case beyond which a peer gets only min_runs samples


FULL = Plan()
# `make bench`'s default plan (headline cases only): fewer samples of the same length, so that
# every family and peer fits in minutes on 2 cores; medians of 9 samples rather than 15.
HEADLINE = Plan(warmup_s=0.5, run_s=0.2, min_runs=3, max_runs=9, budget_s=3.0)
QUICK = Plan(warmup_s=0.05, run_s=0.01, min_runs=3, max_runs=5, budget_s=1.0)


@dataclass(frozen=True)
class Timing:
    samples: list[float]  # seconds per call, one per run
    calls_per_run: int
    first_call_s: float  # the first call alone: compilation, allocator growth, lazy imports

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def q20(self) -> float:
        return float(np.quantile(self.samples, 0.2))

    @property
    def q80(self) -> float:
        return float(np.quantile(self.samples, 0.8))


class Clock:
    """Seconds per call of a callable, waiting for the device to finish (CUDA events on GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], Any], calls: int) -> float:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls


def _warm_up(clock: Clock, fn: Callable[[], Any], plan: Plan) -> float:
    """The mean warm call in seconds (the first call is made and timed before this).

    Warm-up runs for a set time rather than a set count: fast calls get many (their mean is what
    sizes the samples, and one call is too noisy for that), slow ones a single call.
    """
    spent, count = 0.0, 0
    while count == 0 or spent < plan.warmup_s:
        spent += clock.per_call(fn, 1)
        count += 1
    return spent / count


def _late_after_first_call(first_s: float, plan: Plan, deadline: float, now: Callable[[], float]) -> Skipped | None:
    """A peer whose first call alone shows that its warm-up and ``min_runs`` samples would end
    past the deadline (taking the first call as the time per call: compiling peers look slower
    than they are, and are the ones left out when time is short)."""
    rest = max(plan.warmup_s, first_s) + plan.min_runs * max(plan.run_s, first_s)
    left = deadline - now()
    if rest <= left:
        return None
    return Skipped(
        f"left out after its first call ({first_s:.3g} s): its warm-up and {plan.min_runs} samples would take "
        f"about {rest:.0f} s, more than the {max(left, 0):.0f} s its case has left of the run's time budget "
        "(--budget S or --full to time it)"
    )


def time_peers(
    fns: dict[str, Callable[[], Any]],
    clock: Clock,
    plan: Plan,
    deadline: float | None = None,
    now: Callable[[], float] = time.perf_counter,
    keep: str | None = None,
    expected_s: dict[str, float] | None = None,
) -> dict[str, Timing | BaseException]:
    """Time every callable of ``fns``; a callable that raises gets its exception instead.

    ``deadline``: a reading of ``now`` by which the sampling should end (a run's time budget,
    :mod:`bench._budget`). A peer whose warm-up would start after it, or would not end before it by
    ``expected_s`` (:func:`left_out`), is left out (a :class:`~bench._case.Skipped` result), except
    ``keep`` (the case's subject, which every other peer is compared with). After the warm-ups
    the time left is split evenly among the peers and caps each one's ``plan.budget_s``; a peer
    still gets at least ``plan.min_runs`` samples.
    """
    results: dict[str, Timing | BaseException] = {}
    first: dict[str, float] = {}
    calls: dict[str, int] = {}
    runs: dict[str, int] = {}
    estimates: dict[str, float] = {}
    for name, fn in fns.items():
        skipped = left_out(name, keep, deadline, now, expected_s)
        if skipped is not None:
            results[name] = skipped
            continue
        try:
            first_s = clock.per_call(fn, 1)  # pays for compilation and lazy set-up
            late = None if deadline is None or name == keep else _late_after_first_call(first_s, plan, deadline, now)
            if late is not None:
                results[name] = late
                continue
            first[name], estimates[name] = first_s, _warm_up(clock, fn, plan)
        except Exception as exc:  # a peer failing is a result to report, not a reason to stop
            results[name] = exc
    per_peer_s = plan.budget_s
    if deadline is not None and estimates:
        per_peer_s = min(per_peer_s, max(0.0, deadline - now()) / len(estimates))
    for name, estimate in estimates.items():
        calls[name] = max(1, math.ceil(plan.run_s / max(estimate, 1e-9)))
        affordable = int(per_peer_s / max(estimate * calls[name], 1e-9))
        runs[name] = min(plan.max_runs, max(plan.min_runs, affordable))

    samples: dict[str, list[float]] = {name: [] for name in runs}
    # The collector would otherwise run at whichever peer's turn it happens to come due.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(max(runs.values(), default=0)):
            due = [name for name in runs if len(samples[name]) < runs[name] and name not in results]
            shift = round_ % len(due) if due else 0
            for name in due[shift:] + due[:shift]:
                try:
                    samples[name].append(clock.per_call(fns[name], calls[name]))
                except Exception as exc:
                    results[name] = exc
    finally:
        if gc_was_enabled:
            gc.enable()

    for name in runs:
        if name not in results:
            results[name] = Timing(samples[name], calls[name], first[name])
    return {name: results[name] for name in fns}
