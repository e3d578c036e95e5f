"""The row schema: one row per (case, peer), as written to JSON and read by the table and plot."""

from __future__ import annotations

from typing import Any

from bench._case import Case, Unavailable
from bench._timing import Timing


def make_row(
    family: str,
    case: Case,
    peer: str,
    result: Timing | BaseException,
    peak: int | None,
    floor_gbps: float,
    env: dict[str, Any],
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "family": family,
        "case": case.name,
        "mode": case.mode,
        "peer": peer,
        "subject": peer == case.subject,
        "headline": case.headline,
        "params": case.params,
        "bytes": case.bytes,
        "status": "ok",
        "reason": None,
        "median_s": None,
        "q20_s": None,
        "q80_s": None,
        "runs": 0,
        "calls_per_run": 0,
        "first_call_s": None,
        "peak_mem_bytes": peak,
        "gbps": None,
        "floor_fraction": None,
        "subject_over_peer": None,  # filled by add_ratios
        **env,
    }
    if isinstance(result, Timing):
        gbps = case.bytes / result.median / 1e9
        row.update(
            median_s=result.median,
            q20_s=result.q20,
            q80_s=result.q80,
            runs=len(result.samples),
            calls_per_run=result.calls_per_run,
            first_call_s=result.first_call_s,
            gbps=gbps,
            floor_fraction=gbps / floor_gbps,
        )
    else:
        row["status"] = result.status if isinstance(result, Unavailable) else "error"
        row["reason"] = str(result) if isinstance(result, Unavailable) else f"{type(result).__name__}: {result}"
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``subject_over_peer`` = subject time / peer time on every timed non-subject row.

    Below 1 the subject (kexue) is faster than that peer; at or above 1 it is not.
    """
    subjects = {(r["family"], r["case"], r["mode"]): r for r in rows if r["subject"]}
    for row in rows:
        subject = subjects.get((row["family"], row["case"], row["mode"]))
        if row["subject"] or subject is None or subject["median_s"] is None or row["median_s"] is None:
            continue
        row["subject_over_peer"] = subject["median_s"] / row["median_s"]


def not_faster(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of peers that the subject does not beat."""
    return [r for r in rows if r["subject_over_peer"] is not None and r["subject_over_peer"] >= 1.0]
