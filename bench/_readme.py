"""The README's results table, regenerated from a run's headlines (``python -m bench`` does it).

The table sits between two marker lines in README.md; everything else in the file is left as it
is. Families not run this time keep their previous lines, so ``--only`` refreshes one family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._ratio import duration, speed
from bench._ratio import goal as goal_text
from bench._table import fmt_time

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
HEAD = ["| family | case | kexue vs | measured | goal | met |", "|---|---|---|---|---|---|"]


def _lines(family: str, headlines: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for h in headlines:
        ratio = f"{h['peer']} ({h['mode']})"
        if h["value"] is None:
            measured, met = f"n/a ({h['reason'] or 'not measured'})", "-"
        else:
            times = {
                r["peer"]: r["median_s"]
                for r in rows
                if r["family"] == family and r["case"] == h["case"] and r["mode"] == h["mode"]
            }
            detail = ", ".join(f"{n} {fmt_time(times[n])}" for n in ("kexue", h["peer"]) if times.get(n))
            measured, met = f"{speed(h['factor'])} ({detail})", "yes" if h["met"] else "**no**"
        out.append(f"| {family} | {h['case'] or '-'} | {ratio} | {measured} | {goal_text(h['goal_factor'])} | {met} |")
    return out


def update(
    readme: Path,
    headlines: dict[str, list[dict]],
    rows: list[dict[str, Any]],
    env: dict[str, Any],
    elapsed_s: float | None = None,
) -> bool:
    """Rewrite the table in ``readme``; False (nothing written) when the markers are missing."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    before, rest = text.split(START, 1)
    old, after = rest.split(END, 1)
    kept = {}
    for line in old.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("family",) and not set(cells[0]) <= {"-"}:
            kept.setdefault(cells[0], []).append(line)
    for family, family_headlines in headlines.items():
        kept[family] = _lines(family, family_headlines, rows)
    took = f" The run took {duration(elapsed_s)}." if elapsed_s is not None else ""
    machine = (
        f"Measured on {env['device']}, {env['threads']} threads, torch {env['torch']}, "
        f"kexue {env['kexue']}, {env['date']}.{took}"
    )
    body = [machine, "", *HEAD] + [line for family in sorted(kept) for line in kept[family]]
    readme.write_text(before + START + "\n" + "\n".join(body) + "\n" + END + after)
    return True
