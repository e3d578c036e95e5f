"""Sign optimizers: the profiling CLI, one Lion or Tiger case at a size and dtypes of your choice.

``python -m bench.sign_optim --algo tiger --params 100M --dtype fp32`` (bench/sign_optim.py hands its
``__main__`` to :func:`main` here) times kexue's step against the same peers as the benchmark's cases
(bench/sign_optim.py builds them) and prints, besides the table, the bytes a step moves per parameter.
"""

from __future__ import annotations

import functools

import torch

from bench._case import Case
from bench.sign_optim import TENSORS, _inputs, _peers

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _count(text: str) -> int:
    """'100M', '2.5e6', '1G', '50000' -> an int."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def profile_case(
    algo: str, total: int, tensors: int, dtype: str, momentum_dtype: str, device: torch.device, options: dict
) -> Case:
    """One Case for :func:`main`: the given size and dtypes, all peers."""
    per_param, moved = bytes_per_param(algo, dtype, momentum_dtype, options)
    options = {**options, "momentum_dtype": _DTYPES[momentum_dtype]}
    return Case(
        name=f"{total / 1e6:g}M {dtype} in {tensors} tensors, {momentum_dtype} momentum",
        mode=algo,
        bytes=per_param * total,
        setup=functools.partial(_inputs, total, device, False, _DTYPES[dtype], tensors),
        peers=_peers(algo, options, device),
        headline=True,
        params={
            "params": total,
            "tensors": tensors,
            "dtype": dtype,
            "bytes_per_param": per_param,
            "bytes_moved_per_param": moved,
            "momentum_dtype": momentum_dtype,
        },
    )


def bytes_per_param(algo: str, dtype: str, momentum_dtype: str, options: dict) -> tuple[int, int]:
    """(floor, moved) bytes per parameter of a step: the floor reads param, grad and momentum and
    writes param and momentum; Tiger's NaN guard reads the grads once more (its RMS is carried)."""
    size, msize = _DTYPES[dtype].itemsize, _DTYPES[momentum_dtype].itemsize
    floor = 3 * size + 2 * msize
    guard = algo == "tiger" and options.get("nan_guard", "tensor") is not None
    return floor, floor + (size if guard else 0)


def main(argv: list[str] | None = None) -> int:
    """Step time, parameters per second and achieved bandwidth of Lion/Tiger against the peers."""
    import argparse

    from bench._env import describe, row_fields
    from bench._memory import measure_floor
    from bench._rows import add_ratios
    from bench._table import fmt_time, format_family
    from bench._timing import FULL, QUICK, Clock
    from bench.run import run_case

    parser = argparse.ArgumentParser(prog="python -m bench.sign_optim", description=main.__doc__)
    parser.add_argument("--algo", choices=("lion", "tiger"), default="lion")
    parser.add_argument("--params", default="100M", help="parameter count, e.g. 100M, 2.5e7 (default 100M)")
    parser.add_argument("--tensors", type=int, default=TENSORS, help=f"split into this many tensors ({TENSORS})")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="parameter dtype")
    parser.add_argument("--momentum-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--no-nan-guard", action="store_true", help="Tiger without its NaN guard")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="few, short runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = _count(args.params)
    if total < args.tensors or args.tensors < 1:
        parser.error(f"--params ({total}) must be at least --tensors ({args.tensors}) >= 1")
    options = {"nan_guard": None} if args.no_nan_guard and args.algo == "tiger" else {}
    env = describe(device)
    plan = QUICK if args.quick else FULL
    clock = Clock(device)
    print(
        f"{args.algo} step, {total:,} {args.dtype} parameters in {args.tensors} tensors, "
        f"{args.momentum_dtype} momentum, on {env['device']} ({env['threads']} threads, torch {env['torch']})"
    )
    floor = measure_floor(device, clock, plan, args.quick)
    case = profile_case(args.algo, total, args.tensors, args.dtype, args.momentum_dtype, device, options)
    rows = run_case("sign_optim", case, device, clock, plan, floor["gbps"], row_fields(device))
    add_ratios(rows)
    print(format_family("sign_optim", rows, [], floor))
    per_param, moved = case.params["bytes_per_param"], case.params["bytes_moved_per_param"]
    print(
        f"\nbytes per parameter: floor {per_param}, moved by kexue {moved} (the 'floor' column counts the floor's "
        f"{per_param}; Tiger's RMS is carried between steps, its NaN guard reads the grads once more)"
    )
    if moved > per_param:
        print(
            f"Tiger with its NaN guard cannot go below {moved} bytes per parameter on tensors larger than the "
            f"last-level cache, {moved / per_param:.2f}x Lion's {per_param}: whether a tensor's grads hold a NaN "
            "or inf must be known before any of its elements is written, so they are read twice (docs/sign_optim.md)"
        )
    print("\nparameters per second (median step):")
    for r in rows:
        if r["median_s"]:
            print(f"  {r['peer']:<20} {fmt_time(r['median_s']):>10}   {total / r['median_s'] / 1e9:8.3f} G params/s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
