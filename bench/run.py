"""Run the benchmarks: ``python -m bench [--only FAMILY] [--quick] [--out DIR] [--device D] [--threads N]``.

Finds every family module in bench/ (see :mod:`bench`), measures the memory floor, times each
case's peers against each other, prints a table per family, and writes the rows to
``DIR/bench-<time>.json``, plots to ``DIR/bench.png`` (all families) and ``DIR/bench-<family>.png``.
A full run (not ``--quick``) then rewrites the README's results table from that JSON and copies the
per-family plots to docs/bench/; ``--from-json PATH`` does only that, from a saved record.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
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
from bench._case import Case, Unavailable
from bench._env import describe, row_fields
from bench._memory import measure_floor, peak_bytes
from bench._plot import plot
from bench._readme import update as update_readme
from bench._rows import add_ratios, make_row
from bench._table import fmt_time, format_family
from bench._timing import FULL, QUICK, Clock, Plan, Timing, time_peers

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
DOCS_PLOTS = README.parent / "docs" / "bench"
_NOT_FAMILIES = {"run", "gpu"}  # gpu: the GPU suite, python -m bench.gpu
BUSY_LOAD_PER_CPU = 0.5  # load average per CPU above which the header warns about other jobs


def family_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_FAMILIES)


def load_family(name: str) -> ModuleType:
    module = importlib.import_module(f"bench.{name}")
    if not callable(getattr(module, "cases", None)):
        raise TypeError(f"bench/{name}.py must define cases(device, quick) -> list[bench.Case]")
    return module


def run_case(family: str, case: Case, device: torch.device, clock: Clock, plan: Plan,
             floor_gbps: float, env: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = case.setup()
    fns, results = {}, {}
    for peer in case.peers:
        try:
            fns[peer.name] = peer.build(inputs)
        except Unavailable as exc:
            results[peer.name] = exc
    results.update(time_peers(fns, clock, plan))
    peaks = {name: peak_bytes(fn, device) for name, fn in fns.items() if isinstance(results[name], Timing)}
    rows = [make_row(family, case, p.name, results[p.name], peaks.get(p.name), floor_gbps, env) for p in case.peers]
    del inputs, fns
    gc.collect()  # free this case's tensors before the next case allocates its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_family(name: str, device: torch.device, clock: Clock, plan: Plan, quick: bool,
               floor: dict[str, Any], env: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    module = load_family(name)
    cases = module.cases(device, quick)
    rows: list[dict[str, Any]] = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        print(f"[{name} {i}/{len(cases)}] {case.name} {case.mode} ...", end="", file=sys.stderr, flush=True)
        rows += run_case(name, case, device, clock, plan, floor["gbps"], env)
        print(f" {fmt_time(time.perf_counter() - t0)}", file=sys.stderr, flush=True)
    add_ratios(rows)
    headlines = [h.evaluate(rows) for h in getattr(module, "HEADLINES", [])]
    return rows, headlines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Time kexue's ops against their peers; "
                                     "write a table, JSON rows and a plot.")
    parser.add_argument("--only", action="append", metavar="FAMILY", choices=family_names(),
                        help="run only this family (repeatable); default: all of " + ", ".join(family_names()))
    parser.add_argument("--quick", action="store_true", help="small shapes and few runs: a smoke run, not numbers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch.set_num_threads(N) for the run (default: torch's own choice)")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="run nothing: redraw the plots and rewrite the README's table from a saved record")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite the README's results table (a run without --quick does)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _publish_only(args) if args.from_json else _run(args)
    finally:  # main() is also called in-process (tests/test_bench.py)
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with warnings.catch_warnings():
        # A missing kexue._C warns on import; the table reports it per case instead.
        warnings.simplefilter("ignore", RuntimeWarning)
        env = describe(device)
    per_row = row_fields(device)
    plan = QUICK if args.quick else FULL
    clock = Clock(device)
    started = time.perf_counter()

    print(f"kexue bench on {env['device']} ({device.type}), {env['threads']} threads, torch {env['torch']}, "
          f"triton {env['triton']}, kexue {env['kexue']}{', --quick' if args.quick else ''}")
    for backend, state in env["kexue_backends"].items():
        print(f"  backend {backend}: {'available' if state['available'] else state['reason']}")
    if env["load_average"] is not None and env["load_average"] > BUSY_LOAD_PER_CPU * env["cpus"]:
        print(f"  warning: load average {env['load_average']:.2f} on {env['cpus']} CPUs: other jobs share the "
              "machine; absolute times (and multi-threaded CPU ops most) suffer; ratios are steadier")
    floor = measure_floor(device, clock, plan, args.quick)
    print(f"memory floor: {floor['op']} on {floor['elements']} elements, {floor['gbps']:.3g} GB/s "
          f"(median {fmt_time(floor['median_s'])}, q20..q80 {fmt_time(floor['q20_s'])}..{fmt_time(floor['q80_s'])})")

    rows: list[dict[str, Any]] = []
    headlines: dict[str, list[dict]] = {}
    for name in args.only or family_names():
        family_rows, headlines[name] = run_family(name, device, clock, plan, args.quick, floor, per_row)
        rows += family_rows
        print()
        print(format_family(name, family_rows, headlines[name], floor))

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{stamp}.json"
    record = {"env": env, "quick": args.quick, "plan": dataclasses.asdict(plan), "floor": floor, "headlines": headlines,
              "rows": rows, "elapsed_s": time.perf_counter() - started}
    json_path.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {json_path} ({fmt_time(time.perf_counter() - started)} in all)")
    publish(json_path, args.out, readme=not args.quick and not args.no_readme)
    return 0


def publish(json_path: Path, out: Path, readme: bool) -> None:
    """Plots (all families, and one per family) and, if ``readme``, the README's table, from a JSON record.

    With ``readme`` the per-family plots are also copied to docs/bench/, where the README links them.
    """
    record = json.loads(json_path.read_text())
    rows, env, floor, headlines = record["rows"], record["env"], record["floor"], record["headlines"]
    written = [plot(rows, floor, env, out / "bench.png")]
    for name in headlines:
        family_rows = [r for r in rows if r["family"] == name]
        if family_rows:
            written.append(plot(family_rows, floor, env, out / f"bench-{name}.png"))
            if readme:  # the same figure where the README links it
                DOCS_PLOTS.mkdir(parents=True, exist_ok=True)
                written.append(Path(shutil.copyfile(written[-1], DOCS_PLOTS / f"{name}.png")))
    print("wrote " + ", ".join(str(p) for p in written))
    if readme and update_readme(README, headlines, rows, env):
        print(f"updated the results table in {README} from {json_path}")


def _publish_only(args: argparse.Namespace) -> int:
    publish(args.from_json, args.out, readme=not args.no_readme)
    return 0

if __name__ == "__main__":
    sys.exit(main())
