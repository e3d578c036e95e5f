"""The summary of a .ci/gpu-check run: per stage passed / failed / skipped / timed out, and the
GPU benchmark's headlines, as OUTDIR/summary.txt and OUTDIR/summary.json.

    python .ci/gpu_summary.py STAGES_TSV OUTDIR ELAPSED_S DEADLINE_S

STAGES_TSV has one line per stage: name, exit code, seconds, note. A stage's pytest -v log sits
beside it (NAME.log); test outcomes are counted from it, so a stage stopped by its time limit
still reports what finished before the limit.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_OUTCOME = re.compile(r"^(\S+::\S+).*?\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)


def count_outcomes(log: str) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    failed = []
    for test, outcome in _OUTCOME.findall(log):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(test)
    return counts, failed


def verdict(rc: int, counts: dict[str, int]) -> str:
    if rc == -1:
        return "not run"
    if rc in (124, 137):
        return "timed out"
    if counts.get("failed") or counts.get("error"):
        return "failed"
    if rc == 0:
        return "passed"
    if rc == 5:
        return "no tests"
    return f"failed (exit {rc})"


def main(tsv: str, out: str, elapsed: str, deadline: str) -> int:
    logs = Path(tsv).parent
    out_dir = Path(out)
    stages = []
    for line in Path(tsv).read_text().splitlines():
        name, rc, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        log = logs / f"{name}.log"
        counts, failed = count_outcomes(log.read_text(errors="replace")) if log.exists() else ({}, [])
        stages.append(
            {
                "stage": name,
                "verdict": verdict(int(rc), counts),
                "exit": int(rc),
                "seconds": int(seconds),
                "note": note,
                **counts,
                "failed_tests": failed[:20],
            }
        )
    bench_path = out_dir / "gpu-bench.json"
    headlines = []
    if bench_path.exists():
        record = json.loads(bench_path.read_text())
        if record.get("status") == "skipped":
            headlines.append(f"skipped: {record.get('reason')}")
        for family, data in record.get("families", {}).items():
            headlines += [f"{family}: {h['text']}" for h in data.get("headlines", [])]
        if record.get("floor"):
            headlines.insert(0, f"copy floor: {record['floor']['gbps']:.0f} GB/s")
    summary = {"elapsed_s": int(elapsed), "deadline_s": int(deadline), "stages": stages, "headlines": headlines}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"gpu-check: {elapsed} s of a {deadline} s deadline"]
    for s in stages:
        tally = ", ".join(f"{s[k]} {k}" for k in ("passed", "failed", "error", "skipped") if s.get(k))
        lines.append(f"  {s['stage']:<16} {s['verdict']:<10} {s['seconds']:>4} s  {tally}  ({s['note']})")
        lines += [f"      FAILED {t}" for t in s["failed_tests"]]
    lines += ["benchmark headlines:"] + [f"  {h}" for h in headlines] if headlines else ["benchmark: no record"]
    text = "\n".join(lines)
    (out_dir / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
