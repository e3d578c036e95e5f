"""The text report of a family: a table of its rows, what was not timed and why, the comparisons
that kexue loses, and the headline ratios."""

from __future__ import annotations

from typing import Any

from bench._ratio import speed
from bench._rows import not_faster

SLOW_START_S = 1.0  # a first call is reported when it takes longer than this
SLOW_START_FACTOR = 5.0  # ... and this many times the median call


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_ratio(subject_over_peer: float | None) -> str:
    """kexue's time / the peer's, read from kexue's side: "2.30x faster", "1.40x slower"."""
    if subject_over_peer is None:
        return ""
    return speed(1 / subject_over_peer)


def fmt_floor(fraction: float) -> str:
    """Achieved bandwidth as a share of the floor; above it (data that stayed in cache, or a floor
    measured in a busy moment) is marked, never passed off as a real share."""
    return f"{fraction:.0%}" if fraction <= 1 else f"{fraction:.0%}!"


def _cells(row: dict[str, Any], memory: bool) -> list[str]:
    if row["median_s"] is None:
        timed = [row["status"], "", "", ""]
    else:
        spread = f"{fmt_time(row['q20_s'])} .. {fmt_time(row['q80_s'])}"
        timed = [fmt_time(row["median_s"]), spread, f"{row['gbps']:.3g}", fmt_floor(row["floor_fraction"])]
    if memory:
        timed.append(fmt_bytes(row["peak_mem_bytes"]) if row["median_s"] is not None else "")
    return [row["case"], row["mode"], row["peer"], *timed, fmt_ratio(row["subject_over_peer"])]


def format_table(rows: list[dict[str, Any]], subject: str = "kexue") -> str:
    # Peak memory is measured by the CUDA allocator; on CPU there is none to ask, so no column
    # (bench.global_pointer --memory and bench.logn_attention --memory measure CPU peaks apart).
    memory = any(r["peak_mem_bytes"] is not None for r in rows)
    header = [
        "case",
        "mode",
        "peer",
        "median",
        "q20 .. q80",
        "GB/s",
        "floor",
        *(["peak mem"] if memory else []),
        f"{subject} vs peer",
    ]
    body = [_cells(r, memory) for r in rows]
    # Repeated case and mode cells are blanked so each case reads as one block.
    for i in range(len(body) - 1, 0, -1):
        if body[i][:2] == body[i - 1][:2]:
            body[i][0] = body[i][1] = ""
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    right = set(range(3, len(header) - 1))  # numbers align right
    lines = []
    for line in [header, *body]:
        cells = [
            cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_family(family: str, rows: list[dict[str, Any]], headlines: list[dict[str, Any]], floor: dict) -> str:
    out = [
        f"== {family} ==  (floor: {floor['op']} at {floor['gbps']:.3g} GB/s; "
        "GB/s = bytes the op must move / median time; floor = that as a fraction of the floor)",
        format_table(rows),
    ]
    if any(r["floor_fraction"] is not None and r["floor_fraction"] > 1 for r in rows):
        out.append(
            "!: faster than its bytes allow at the floor's bandwidth: its data stayed in cache, "
            "or the machine was busier while the floor was measured"
        )

    untimed = {(r["peer"], r["status"], r["reason"]) for r in rows if r["median_s"] is None}
    if untimed:
        out.append("Not timed:")
        out += [f"  {peer} ({status}): {reason}" for peer, status, reason in sorted(untimed, key=str)]

    # A first call far slower than the rest is compilation or lazy set-up: a cost a user pays once.
    slow_start = [
        r
        for r in rows
        if r["first_call_s"] is not None and r["first_call_s"] > max(SLOW_START_S, SLOW_START_FACTOR * r["median_s"])
    ]
    if slow_start:
        out.append("First call (compilation, set-up; excluded from the timings):")
        out += [f"  {r['peer']} on {r['case']} {r['mode']}: {fmt_time(r['first_call_s'])}" for r in slow_start]

    compared = [r for r in rows if r["subject_over_peer"] is not None]
    losses = not_faster(rows)
    if not compared:
        out.append("No comparison: kexue was not timed in any case.")
    elif losses:
        out.append(f"kexue is NOT faster than the peer in {len(losses)} of {len(compared)} comparisons:")
        out += [f"  {r['peer']} on {r['case']} {r['mode']}: kexue {fmt_ratio(r['subject_over_peer'])}" for r in losses]
    else:
        out.append(f"kexue is faster than the peer in all {len(compared)} comparisons.")

    if headlines:
        out.append("Headlines:")
        out += [f"  {h['text']}" for h in headlines]
    return "\n".join(out)
