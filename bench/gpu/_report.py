"""Rows, goals and the printed table of the GPU benchmark.

A row is one peer on one case: median and 20/80% quantiles of the time per call, TFLOP/s when the
case counts FLOPs, GB/s of the bytes the op must move and their fraction of the measured copy
floor, peak memory, and the subject's speed against this peer, printed in one direction only
("kexue 2.1x faster" / "kexue 1.3x slower").
"""

from __future__ import annotations

from typing import Any

from bench._case import Case, Unavailable
from bench._headline import Headline
from bench._timing import Timing


def make_rows(
    family: str,
    case: Case,
    results: dict[str, Any],
    peaks: dict[str, int | None],
    floor: dict | None,
    env: dict,
    status: str | None = None,
) -> list[dict]:
    flops = case.params.get("flops")
    rows = []
    for peer in case.peers:
        result = results.get(peer.name)
        row: dict[str, Any] = {
            "family": family,
            "case": case.name,
            "mode": case.mode,
            "peer": peer.name,
            "subject": case.subject,
            "headline": case.headline,
            "params": case.params,
            "bytes": case.bytes,
            "device": env.get("device"),
            "median_s": None,
            "q20_s": None,
            "q80_s": None,
            "tflops": None,
            "gbps": None,
            "floor_fraction": None,
            "peak_bytes": peaks.get(peer.name),
            "status": status,
            "reason": None,
        }
        if isinstance(result, Timing):
            median = result.median
            row.update(
                status="ok",
                median_s=median,
                q20_s=result.q20,
                q80_s=result.q80,
                gbps=case.bytes / median / 1e9 if case.bytes else None,
                tflops=flops / median / 1e12 if flops else None,
            )
            if floor and row["gbps"] is not None:
                row["floor_fraction"] = row["gbps"] / floor["gbps"]
        else:
            if row["status"] is None:
                row["status"] = getattr(result, "status", "error") if isinstance(result, Unavailable) else "error"
            row["reason"] = f"{type(result).__name__}: {result}"[:300] if result is not None else "no result"
        rows.append(row)
    subject = next((r for r in rows if r["peer"] == case.subject), None)
    for r in rows:
        r["subject_speedup"] = (
            r["median_s"] / subject["median_s"]
            if subject and subject["median_s"] and r["median_s"] and r is not subject
            else None
        )
    return rows


def evaluate_goals(rows: list[dict], headlines: list[Headline]) -> list[dict]:
    """The family's time-ratio headlines, then each case's floor goal (memory-bound subjects)."""
    out = [h.evaluate(rows) for h in headlines]
    for r in rows:
        goal = r["params"].get("floor_goal")
        if goal is None or r["peer"] != r["subject"]:
            continue
        where = f"{r['case']} {r['mode']}"
        if r["floor_fraction"] is None:
            out.append(
                {
                    "text": f"{r['peer']} on {where}: fraction of the copy floor n/a ({r['status']}; "
                    f"goal >= {goal:.0%})",
                    "value": None,
                    "met": None,
                }
            )
            continue
        met = r["floor_fraction"] >= goal
        out.append(
            {
                "text": f"{r['peer']} on {where}: {r['floor_fraction']:.0%} of the copy floor "
                f"(goal >= {goal:.0%}: {'met' if met else 'NOT MET'})",
                "value": r["floor_fraction"],
                "met": met,
            }
        )
    return out


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _speed(factor: float | None, subject: str) -> str:
    if factor is None:
        return ""
    return f"{subject} {factor:.2f}x faster" if factor >= 1 else f"{subject} {1 / factor:.2f}x slower"


def format_family(name: str, rows: list[dict], goals: list[dict]) -> str:
    head = (
        f"{'case':<34} {'mode':<8} {'peer':<22} {'median':>10} {'q20..q80':>21} {'TFLOP/s':>8} "
        f"{'GB/s':>7} {'floor':>6} {'peak MiB':>9}  vs subject"
    )
    lines = [f"== {name} ==", head, "-" * len(head)]
    for r in rows:
        if r["median_s"] is None:
            lines.append(f"{r['case']:<34} {r['mode']:<8} {r['peer']:<22} {r['status']}: {r['reason']}")
            continue
        spread = f"{_time(r['q20_s'])}..{_time(r['q80_s'])}"
        tflops = f"{r['tflops']:.1f}" if r["tflops"] is not None else "-"
        gbps = f"{r['gbps']:.0f}" if r["gbps"] is not None else "-"
        floor = f"{r['floor_fraction']:.0%}" if r["floor_fraction"] is not None else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        lines.append(
            f"{r['case']:<34} {r['mode']:<8} {r['peer']:<22} {_time(r['median_s']):>10} {spread:>21} "
            f"{tflops:>8} {gbps:>7} {floor:>6} {peak:>9}  {_speed(r['subject_speedup'], r['subject'])}"
        )
    lines += [f"  goal: {g['text']}" for g in goals]
    return "\n".join(lines)
