"""Run the benchmarks: ``python -m bench [--full] [--only FAMILY] [--quick] [--budget S] [--out DIR]
[--device D] [--threads N]``.

Finds every family module in bench/ (see :mod:`bench`), measures the memory floor, times each
case's peers against each other, prints a table per family, and writes the rows to
``DIR/bench-<time>.json``, plots to ``DIR/bench.png`` (all families) and ``DIR/bench-<family>.png``.
By default only each family's headline cases run (every peer of them: minutes); ``--full`` runs
every case. The default plan runs under a time budget (``--budget``, :mod:`bench._budget`): its
families share it, and a case that would overrun it is skipped with the reason. A run writes
nothing outside DIR (bench/results/, ignored by git).

``--publish [JSON]`` runs nothing: it rewrites the README's results table from a record (default:
the newest in DIR) and copies its per-family plots to docs/bench/, and refuses a record whose
load check failed (other jobs were running: its times are not this machine's).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import pkgutil
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import bench
from bench._budget import DEFAULT_BUDGET_S, Budget, case_weight, expected_costs, history
from bench._case import Case
from bench._env import describe, row_fields
from bench._measure import measure_case
from bench._memory import measure_floor
from bench._plot import plot
from bench._ratio import duration
from bench._readme import update as update_readme
from bench._rows import add_ratios, make_row
from bench._table import fmt_time, format_family
from bench._timing import FULL, HEADLINE, QUICK, Clock, Plan

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LATEST = Path("latest")  # --publish without a path: the newest record in --out
README = Path(__file__).resolve().parent.parent / "README.md"
DOCS_PLOTS = README.parent / "docs" / "bench"
_NOT_FAMILIES = {"run", "gpu"}  # gpu: the GPU suite, python -m bench.gpu
BUSY_LOAD_PER_CPU = 0.5  # load average per CPU above which the header warns about other jobs


def family_names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(bench.__path__)
        if not m.name.startswith("_") and m.name not in _NOT_FAMILIES
    )


def load_family(name: str) -> ModuleType:
    module = importlib.import_module(f"bench.{name}")
    if not callable(getattr(module, "cases", None)):
        raise TypeError(f"bench/{name}.py must define cases(device, quick) -> list[bench.Case]")
    return module


def run_case(
    family: str,
    case: Case,
    device: torch.device,
    clock: Clock,
    plan: Plan,
    floor_gbps: float,
    env: dict[str, Any],
    deadline: float | None = None,
    expected_s: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    results, peaks = measure_case(case, device, clock, plan, deadline, expected_s=expected_s)
    return [make_row(family, case, p.name, results[p.name], peaks.get(p.name), floor_gbps, env) for p in case.peers]


def plan_family(name: str, device: torch.device, quick: bool, full: bool = False) -> tuple[ModuleType, list[Case]]:
    """A family's module and the cases this run measures (the default plan: the headline ones)."""
    module = load_family(name)
    cases = module.cases(device, quick)
    if not full:  # the default plan: the cases the family's headlines are read from
        cases = [c for c in cases if c.headline]
    return module, cases


def family_weight(cases: list[Case]) -> int:
    return sum(case_weight(c) for c in cases)


def run_family(
    name: str,
    device: torch.device,
    clock: Clock,
    plan: Plan,
    quick: bool,
    floor: dict[str, Any],
    env: dict[str, Any],
    full: bool = False,
    budget: Budget | None = None,
    deadline: float | None = None,
    planned: tuple[ModuleType, list[Case]] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Rows and headlines of one family. With a ``budget``, the family should end by ``deadline``
    (a ``budget.now()`` reading): each case gets its share of that time, and a case that no
    longer fits in the whole budget is skipped (its rows say why)."""
    module, cases = planned or plan_family(name, device, quick, full)
    weights = [case_weight(c) for c in cases]
    rows: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        print(f"[{name} {i + 1}/{len(cases)}] {case.name} {case.mode} ...", end="", file=sys.stderr, flush=True)
        skipped = budget.check(name, case, plan) if budget is not None else None
        if skipped is not None:
            print(f" skipped: {skipped}", file=sys.stderr, flush=True)
            rows += [make_row(name, case, p.name, skipped, None, floor["gbps"], env) for p in case.peers]
            continue
        case_deadline, expected = None, None
        if budget is not None:
            case_deadline = budget.case_deadline(deadline if deadline is not None else budget.now(), weights, i)
            expected = expected_costs(case, plan, name, budget.known)
        rows += run_case(name, case, device, clock, plan, floor["gbps"], env, case_deadline, expected)
        print(f" {fmt_time(time.perf_counter() - t0)}", file=sys.stderr, flush=True)
    add_ratios(rows)
    headlines = [h.evaluate(rows) for h in getattr(module, "HEADLINES", [])]
    return rows, headlines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Time kexue's ops against their peers; write a table, JSON rows and a plot."
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="FAMILY",
        choices=family_names(),
        help="run only this family (repeatable); default: all of " + ", ".join(family_names()),
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every case of every family (default: each family's headline cases, every peer)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help=f"seconds of wall time for the whole run (default {DEFAULT_BUDGET_S:.0f} for the default plan, "
        "none for --full and --quick): families share it by their number of peers, cases take fewer "
        "samples to fit, and a case that would overrun it is skipped with the reason",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and few runs: a smoke run, not numbers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch.set_num_threads(N) for the run (default: torch's own choice)"
    )
    parser.add_argument(
        "--publish",
        nargs="?",
        type=Path,
        const=LATEST,
        metavar="JSON",
        help="run nothing: rewrite the README's results table and docs/bench/ plots from a "
        "record (default: the newest in --out); refused if its load check failed",
    )
    # Runs no longer write the README (only --publish does); the flag stays accepted so that
    # scripts written for the old behaviour keep working.
    parser.add_argument("--no-readme", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _publish(args) if args.publish else _run(args)
    finally:  # main() is also called in-process (tests/test_bench.py)
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    budget_s = args.budget if args.budget is not None else None if args.full or args.quick else DEFAULT_BUDGET_S
    budget = Budget(budget_s, known=history(args.out)) if budget_s is not None else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with warnings.catch_warnings():
        # A missing kexue._C warns on import; the table reports it per case instead.
        warnings.simplefilter("ignore", RuntimeWarning)
        env = describe(device)
    per_row = row_fields(device)
    plan = QUICK if args.quick else FULL if args.full else HEADLINE
    clock = Clock(device)

    plan_name = "full plan" if args.full else "headline cases (--full for all)"
    budget_text = f"; budget {budget.total_s:.0f} s" if budget else ""
    print(
        f"kexue bench on {env['device']} ({device.type}), {env['threads']} threads, torch {env['torch']}, "
        f"triton {env['triton']}, kexue {env['kexue']}; {plan_name}{', --quick' if args.quick else ''}{budget_text}"
    )
    for backend, state in env["kexue_backends"].items():
        print(f"  backend {backend}: {'available' if state['available'] else state['reason']}")
    load = load_check(env)
    if not load["ok"]:
        print(f"  warning: {load['text']}")
    floor = measure_floor(device, clock, plan, args.quick)
    print(
        f"memory floor: {floor['op']} on {floor['elements']} elements, {floor['gbps']:.3g} GB/s from the "
        f"fastest of {floor['runs']} samples ({fmt_time(floor['best_s'])}; median {fmt_time(floor['median_s'])})"
    )

    names = args.only or family_names()
    planned = {name: plan_family(name, device, args.quick, args.full) for name in names}
    weights = [family_weight(planned[name][1]) for name in names]
    rows: list[dict[str, Any]] = []
    headlines: dict[str, list[dict]] = {}
    for i, name in enumerate(names):
        deadline = budget.family_deadline(weights, i) if budget else None
        family_rows, headlines[name] = run_family(
            name, device, clock, plan, args.quick, floor, per_row, args.full, budget, deadline, planned[name]
        )
        rows += family_rows
        print()
        print(format_family(name, family_rows, headlines[name], floor))

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{stamp}.json"
    elapsed = time.perf_counter() - started
    record = {
        "env": env,
        "quick": args.quick,
        "full": args.full,
        "plan": dataclasses.asdict(plan),
        "load": load,
        "floor": floor,
        "headlines": headlines,
        "rows": rows,
        "elapsed_s": elapsed,
        "budget": {"total_s": budget.total_s, "skipped": budget.skipped} if budget else None,
    }
    json_path.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {json_path}")
    draw(record, args.out)
    wall = time.perf_counter() - started
    if budget:
        print(f"wall time {duration(wall)} of a {duration(budget.total_s)} budget", end="")
        print(f"; {len(budget.skipped)} case(s) skipped to stay within it:" if budget.skipped else "")
        for text in budget.skipped:
            print(f"  {text}")
    else:
        print(f"wall time {duration(wall)}")
    if load["ok"] and not args.quick:
        print("to put these results in README.md and docs/bench/: make bench-publish")
    return 0


def load_check(env: dict[str, Any]) -> dict[str, Any]:
    """Whether the machine was free enough at the start of the run for its times to be published."""
    load, cpus = env.get("load_average"), env.get("cpus") or 1
    ok = load is None or load <= BUSY_LOAD_PER_CPU * cpus
    text = (
        f"load average {load:.2f} on {cpus} CPUs: other jobs share the machine; absolute times (and "
        "multi-threaded CPU ops most) suffer, ratios less; this run will not be published"
        if not ok
        else "the machine was free"
    )
    return {"ok": ok, "load_average": load, "cpus": cpus, "limit_per_cpu": BUSY_LOAD_PER_CPU, "text": text}


def draw(record: dict[str, Any], out: Path) -> list[Path]:
    """Plots from a record, in ``out``: all families in bench.png, and one bench-<family>.png each."""
    rows, env, floor = record["rows"], record["env"], record["floor"]
    written = [plot(rows, floor, env, out / "bench.png")]
    for name in record["headlines"]:
        family_rows = [r for r in rows if r["family"] == name]
        if family_rows:
            written.append(plot(family_rows, floor, env, out / f"bench-{name}.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return written


def newest_record(out: Path) -> Path:
    records = sorted(out.glob("bench-*.json"))
    if not records:
        raise FileNotFoundError(f"no bench-*.json in {out}: run `make bench` first")
    return records[-1]


def publish(json_path: Path, out: Path) -> bool:
    """The README's table and docs/bench/ plots from a record; False (nothing written) when the
    record's load check failed or it is a --quick smoke run."""
    record = json.loads(json_path.read_text())
    load = record.get("load") or load_check(record["env"])
    if not load["ok"]:
        print(
            f"not published: {json_path} was measured on a busy machine ({load['text']}); "
            "rerun `make bench` when the machine is free",
            file=sys.stderr,
        )
        return False
    if record.get("quick"):
        print(f"not published: {json_path} is a --quick smoke run", file=sys.stderr)
        return False
    headlines = record["headlines"]
    DOCS_PLOTS.mkdir(parents=True, exist_ok=True)
    for path in draw(record, out)[1:]:  # the per-family figures, where the README links them
        shutil.copyfile(path, DOCS_PLOTS / f"{path.stem.removeprefix('bench-')}.png")
    if update_readme(README, headlines, record["rows"], record["env"], record.get("elapsed_s")):
        print(f"updated the results table in {README} and the plots in {DOCS_PLOTS} from {json_path}")
    return True


def _publish(args: argparse.Namespace) -> int:
    try:
        path = newest_record(args.out) if args.publish == LATEST else args.publish
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if publish(path, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
