"""Runner of the GPU benchmark (see :mod:`bench.gpu`): deadline, copy floor, cases, table, JSON."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench._case import Case, Unavailable
from bench._env import describe
from bench._measure import measure_case
from bench._timing import Clock, Plan, time_peers
from bench.gpu import FAMILIES
from bench.gpu._report import evaluate_goals, format_family, make_rows

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "gpu"
# Short samples: a GPU call is microseconds to milliseconds and CUDA events are exact, so a few
# hundred milliseconds per peer give a stable median; the deadline matters more than the last 1%.
PLANS = {
    "smoke": Plan(warmup_s=0.0, run_s=0.0, min_runs=2, max_runs=2, budget_s=0.1),
    "default": Plan(warmup_s=0.1, run_s=0.02, min_runs=5, max_runs=15, budget_s=0.5),
    "full": Plan(warmup_s=0.2, run_s=0.05, min_runs=5, max_runs=20, budget_s=1.5),
}
COPY_FLOOR_BYTES = {"smoke": 1 << 22, "default": 1 << 31, "full": 1 << 31}  # per buffer
CASE_MIN_S = 8.0
# Attention has the most cases and peers, and compiling FlexAttention takes ~10 s a case.
WEIGHTS = {
    "logn_attention": 3.0,
    "sign_optim": 1.0,
    "global_pointer": 1.0,
    "entropy_norm": 0.5,
    "biohash": 1.0,
}  # a case is not started with less time than this left to its family


def measure_copy_floor(device: torch.device, clock: Clock, plan_name: str) -> dict[str, Any]:
    """Device-to-device copy of a buffer far larger than L2, bytes read plus bytes written per second."""
    n = COPY_FLOOR_BYTES[plan_name] // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    timing = time_peers({"copy": lambda: dst.copy_(src)}, clock, PLANS[plan_name])["copy"]
    if isinstance(timing, BaseException):
        raise timing
    moved = 2 * 4 * n
    return {
        "op": "dst.copy_(src) fp32",
        "bytes": moved,
        "median_s": timing.median,
        "q20_s": timing.q20,
        "q80_s": timing.q80,
        "gbps": moved / timing.median / 1e9,
    }


def run_case(
    family: str, case: Case, device: torch.device, clock: Clock, plan: Plan, floor: dict, env: dict
) -> list[dict]:
    results, peaks = measure_case(case, device, clock, plan)
    return make_rows(family, case, results, peaks, floor, env)


def not_run_rows(family: str, case: Case, why: str) -> list[dict]:
    return make_rows(family, case, {p.name: Unavailable(why) for p in case.peers}, {}, None, {}, status="not run")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds for the whole run; cases that no longer fit are listed as not run",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=FAMILIES,
        metavar="FAMILY",
        help="run only this family (repeatable); default: " + ", ".join(FAMILIES),
    )
    parser.add_argument(
        "--plan",
        choices=tuple(PLANS),
        default="default",
        help="default: the headline shapes; full: every shape; smoke: tiny shapes on any device, "
        "to check the code paths (measures nothing)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "gpu-bench.json"
    if args.plan != "smoke" and not torch.cuda.is_available():
        print("bench.gpu: no GPU (torch sees no CUDA device): skipped. `--plan smoke` runs the code paths on CPU.")
        json_path.write_text(json.dumps({"status": "skipped", "reason": "no CUDA device"}, indent=1))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a missing kexue._C: the rows say so per case
        env = describe(device)
    clock = Clock(device)
    plan = PLANS[args.plan]
    floor = measure_copy_floor(device, clock, args.plan)
    print(
        f"kexue GPU bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"plan {args.plan}, deadline {args.deadline:.0f} s"
    )
    print(
        f"copy floor: {floor['gbps']:.0f} GB/s (read + write, {floor['bytes'] / 2**30:.1f} GiB, "
        f"median {floor['median_s'] * 1e3:.3f} ms)"
    )
    record: dict[str, Any] = {"status": "running", "env": env, "plan": args.plan, "floor": floor, "families": {}}
    families = args.only or list(FAMILIES)
    text = []
    for i, name in enumerate(families):
        module = importlib.import_module(f"bench.gpu.{name}")
        # Each family gets its weight's share of what is left, so a family that finishes early
        # leaves its time to the later ones and a slow one cannot starve them.
        weights = [WEIGHTS.get(f, 1.0) for f in families[i:]]
        family_deadline = time.perf_counter() + (deadline - time.perf_counter()) * weights[0] / sum(weights)
        rows: list[dict] = []
        for case in module.cases(device, args.plan):
            left = family_deadline - time.perf_counter()
            if left < CASE_MIN_S and args.plan != "smoke":
                rows += not_run_rows(name, case, f"deadline: {left:.0f} s left to {name}")
                continue
            t0 = time.perf_counter()
            print(f"[{name}] {case.name} {case.mode} ...", end="", file=sys.stderr, flush=True)
            try:
                rows += run_case(name, case, device, clock, plan, floor, env)
            except torch.cuda.OutOfMemoryError as exc:
                rows += not_run_rows(name, case, f"out of memory: {str(exc).splitlines()[0]}")
                torch.cuda.empty_cache()
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        headlines = evaluate_goals(rows, getattr(module, "HEADLINES", []))
        record["families"][name] = {"rows": rows, "headlines": headlines}
        table = format_family(name, rows, headlines)
        print("\n" + table, flush=True)
        text.append(table)
        record["elapsed_s"] = time.perf_counter() - started
        json_path.write_text(json.dumps(record, indent=1, default=str))  # after each family: a kill keeps it
    record["status"] = "done"
    record["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    json_path.write_text(json.dumps(record, indent=1, default=str))
    (args.out / "gpu-bench.txt").write_text("\n\n".join(text) + "\n")
    print(f"\nwrote {json_path} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
