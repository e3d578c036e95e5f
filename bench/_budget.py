"""A wall-clock budget for a bench run, so that ``make bench`` ends in minutes on 2 cores.

The default plan (each family's headline cases, every peer) gets :data:`DEFAULT_BUDGET_S` seconds
in all, the memory floor included. The families share what is left when each starts, in
proportion to their weights (the number of peers they time), so time one family saves goes to
the next and time it overspends comes out of the rest. Inside a family each case gets a deadline
the same way; :func:`bench._timing.time_peers` takes fewer samples to meet it (never fewer than
the plan's ``min_runs``), and a peer that would not finish by then is left out
(:func:`bench._timing.left_out`). A case whose cheapest useful measurement (the subject and its
quickest peer, each warmed up and sampled ``min_runs`` times) no longer fits in what is left of
the whole budget is skipped and reported with the reason, rather than run past the budget.

That cheapest measurement includes each peer's first call (``torch.compile`` compiles in it) and
its time per call, which only a run can tell: they are read from the newest earlier records in
the results folder that timed the same case and peer (:func:`history`); without one, a peer is
assumed to need its warm-up and ``min_runs`` samples of ``run_s``, and a first call or a case's
input set-up that takes longer is paid for by the cases after it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._case import Case, Skipped
from bench._timing import Plan

DEFAULT_BUDGET_S = 360.0  # 6 minutes: `make bench` must end within 8 on 2 cores; a started call can overrun


def case_weight(case: Case) -> int:
    """A case's claim on its family's time: one share per peer timed."""
    return max(1, len(case.peers))


Key = tuple[str, str, str, str]  # (family, case, mode, peer)
HISTORY_RECORDS = 5  # how many of the newest records in the results folder are read for costs


def history(out: Path, records: int = HISTORY_RECORDS) -> dict[Key, dict[str, Any]]:
    """The newest timed row of each (family, case, mode, peer) in the newest ``records`` bench
    records of ``out`` (unreadable files are passed over: they only inform an estimate)."""
    rows: dict[Key, dict[str, Any]] = {}
    for path in sorted(out.glob("bench-*.json"))[-records:]:  # oldest first: newer rows overwrite
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("quick"):
            continue
        for row in record.get("rows", []):
            if row.get("median_s") and row.get("first_call_s") is not None:
                rows[(row["family"], row["case"], row["mode"], row["peer"])] = row
    return rows


def peer_cost_s(plan: Plan, row: dict[str, Any] | None = None) -> float:
    """The least one peer can take under ``plan``: its first call, its warm-up (at least one more
    call) and ``min_runs`` samples of at least ``run_s``, with the first call and the time per
    call of an earlier ``row``; without one, calls count as instant."""
    if row is None:
        return plan.warmup_s + plan.min_runs * plan.run_s
    call = float(row["median_s"])
    calls = max(1, math.ceil(plan.run_s / max(call, 1e-9)))
    return float(row["first_call_s"]) + max(plan.warmup_s, call) + plan.min_runs * calls * call


def expected_costs(case: Case, plan: Plan, family: str, known: dict[Key, dict[str, Any]]) -> dict[str, float]:
    """:func:`peer_cost_s` of each peer of ``case`` that an earlier run timed."""
    keys = {p.name: (family, case.name, case.mode, p.name) for p in case.peers}
    return {name: peer_cost_s(plan, known[key]) for name, key in keys.items() if key in known}


def least_case_cost_s(
    case: Case, plan: Plan, family: str = "", known: dict[Key, dict[str, Any]] | None = None
) -> float:
    """What a case needs to say anything: its subject and its quickest other peer, each at
    :func:`peer_cost_s` (the other peers are left out one by one when time is short)."""
    known = known or {}
    costs = {p.name: peer_cost_s(plan, known.get((family, case.name, case.mode, p.name))) for p in case.peers}
    subject = costs.pop(case.subject, 0.0)
    return subject + min(costs.values(), default=0.0)


@dataclass
class Budget:
    """``total_s`` seconds of wall time from construction; ``now`` is the clock (a fake in tests)."""

    total_s: float
    now: Callable[[], float] = time.perf_counter
    known: dict[Key, dict[str, Any]] = field(default_factory=dict)  # earlier timings (:func:`history`)
    started: float = field(init=False)
    skipped: list[str] = field(default_factory=list, init=False)  # "family: case mode (why)"

    def __post_init__(self) -> None:
        if isinstance(self.total_s, bool) or not isinstance(self.total_s, (int, float)) or not self.total_s > 0:
            raise ValueError(f"budget must be a positive number of seconds, got {self.total_s!r}")
        self.started = self.now()

    def spent(self) -> float:
        return self.now() - self.started

    def left(self) -> float:
        return max(0.0, self.total_s - self.spent())

    def share(self, weight: float, weights_left: float) -> float:
        """Seconds for a part of weight ``weight`` when the parts not yet run (it included) weigh
        ``weights_left`` together: its proportion of what is left now."""
        if weights_left <= 0:
            return self.left()
        return self.left() * min(1.0, weight / weights_left)

    def family_deadline(self, weights: Sequence[float], index: int) -> float:
        """The clock reading by which family ``index`` of ``weights`` (in run order) should end."""
        return self.now() + self.share(weights[index], sum(weights[index:]))

    def case_deadline(self, family_deadline: float, weights: Sequence[float], index: int) -> float:
        """The clock reading by which case ``index`` of a family's ``weights`` should end: its
        proportion of the family's time left, within what is left of the whole budget."""
        family_left = max(0.0, family_deadline - self.now())
        share = family_left * min(1.0, weights[index] / max(sum(weights[index:]), 1e-12))
        return self.now() + min(share, self.left())

    def check(self, family: str, case: Case, plan: Plan) -> Skipped | None:
        """None when ``case`` can still be measured within the budget; otherwise the
        :class:`~bench._case.Skipped` that its rows report (and the skip is recorded)."""
        need, left = least_case_cost_s(case, plan, family, self.known), self.left()
        if need <= left:
            return None
        timed = sum((family, case.name, case.mode, p.name) in self.known for p in case.peers)
        basis = f"; first calls and times per call of {timed} peers from earlier runs" if timed else ""
        reason = (
            f"over the run's {self.total_s:.0f} s budget: {left:.0f} s left, the case needs at least "
            f"{need:.0f} s ({case.subject} and its quickest peer: first call, warm-up, {plan.min_runs} samples "
            f"each{basis}); --budget S or --full to run it"
        )
        self.skipped.append(f"{family}: {case.name} {case.mode} ({reason})")
        return Skipped(reason)
