"""Ahead-of-time compilation of every shipped Triton kernel configuration for sm_80 and sm_90.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` builds the
PTX and the cubin on any machine, and the ``cuobjdump`` that ships inside the triton wheel reads
the cubin's resources (REG, STACK, SHARED, LOCAL). A configuration fails when it spills (LOCAL > 0),
uses a stack (STACK > 0) or does not compile at all.

Every module of ``kexue.triton_kernels`` that defines ``AOT_CONFIGS`` is covered; a new op family
only adds that list. Each entry is a dict:

    kernel      the @triton.jit function
    signature   {argument name: type}, e.g. "*fp32", "*bf16", "i32", "fp32", "constexpr"
    constexprs  {argument name: value} for the constexpr arguments
    num_warps   optional (default 4); num_stages optional
    name        optional label for the table (default: the kernel's name)

This module is a library (tests/test_gpu_compile.py) and a script: ``python tests/gpu_compile.py``
prints the table and exits non-zero on a failure. Must run without TRITON_INTERPRET=1 (under the
interpreter @triton.jit yields functions that cannot be compiled); :func:`run_subprocess` takes
care of that from a test process.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context

ARCHS = (80, 90)
WARP_SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Result:
    module: str
    name: str
    arch: int
    num_warps: int
    reg: int | None = None
    stack: int | None = None
    shared: int | None = None  # static shared memory in the cubin
    dyn_shared: int | None = None  # dynamic shared memory triton requests at launch (reductions)
    local: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.local == 0 and self.stack == 0

    def problem(self) -> str | None:
        if self.error is not None:
            return self.error
        if self.local:
            return f"spills: LOCAL {self.local} bytes"
        if self.stack:
            return f"uses a stack: STACK {self.stack} bytes"
        return None


# ---------------------------------------------------------------------------------------------
# Discovery.


def kernel_package():
    """``kexue.triton_kernels`` when kexue is installed, else the source tree's ``triton_kernels``
    (the same files: setup.py maps that folder onto the package)."""
    try:
        return importlib.import_module("kexue.triton_kernels")
    except ImportError:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        return importlib.import_module("triton_kernels")


def discover() -> list[tuple[str, int, dict]]:
    """``(module name, index, config)`` for every entry of every module's AOT_CONFIGS."""
    package = kernel_package()
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for index, config in enumerate(getattr(module, "AOT_CONFIGS", ())):
            found.append((module.__name__, index, config))
    return found


# ---------------------------------------------------------------------------------------------
# Compilation of one configuration for one architecture.

_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def parse_resource_usage(text: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the (single) function in ``cuobjdump --dump-resource-usage`` output."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" in line:
            for key, value in _RESOURCE.findall(line):
                values[key] = int(value)
    missing = {"REG", "STACK", "SHARED", "LOCAL"} - values.keys()
    if missing:
        raise ValueError(f"cuobjdump output lacks {sorted(missing)}:\n{text}")
    return values


def _fp_fusion() -> bool:
    """What a JIT launch would use (triton's default, unless disabled by the environment)."""
    from triton import knobs

    lang = knobs.language
    return bool(getattr(lang, "default_fp_fusion", True)) and not getattr(lang, "force_disable_fp_fusion", False)


def compile_config(config: dict, arch: int, module: str = "?") -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = config["kernel"]
    num_warps = int(config.get("num_warps", 4))
    result = Result(module=module, name=config.get("name", kernel.__name__), arch=arch, num_warps=num_warps)
    options = {"num_warps": num_warps, "enable_fp_fusion": _fp_fusion()}
    if "num_stages" in config:
        options["num_stages"] = int(config["num_stages"])
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=config["signature"],
                                           constexprs=config.get("constexprs", {}))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            out = subprocess.run([cuobjdump(), "--dump-resource-usage", path],
                                 capture_output=True, text=True, check=True).stdout
        usage = parse_resource_usage(out)
        result.reg, result.stack, result.shared, result.local = (
            usage["REG"], usage["STACK"], usage["SHARED"], usage["LOCAL"])
        result.dyn_shared = int(compiled.metadata.shared)
    except Exception as exc:  # reported per configuration, not raised: the table shows them all
        message = str(exc).strip().splitlines()
        result.error = f"{type(exc).__name__}: {message[-1] if message else ''}"[:300]
    return result


def _compile_job(module: str, index: int, arch: int) -> Result:
    config = importlib.import_module(module).AOT_CONFIGS[index]
    return compile_config(config, arch, module)


def compile_all(archs=ARCHS, jobs: int | None = None) -> list[Result]:
    """Compile every configuration for every arch, in ``jobs`` processes (default: all cores)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset; use run_subprocess()")
    work = [(module, index, arch) for module, index, _ in discover() for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_job(*w) for w in work]
    # spawn: a fresh interpreter per worker, no forked torch/OpenMP state.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(sys.path,)) as pool:
        return list(pool.map(_compile_job, *zip(*work, strict=True)))


def _worker_init(path: list[str]) -> None:
    sys.path[:] = path


def run_subprocess(archs=ARCHS, timeout: float = 1800) -> list[Result]:
    """:func:`compile_all` in a child process without TRITON_INTERPRET (for interpreter test runs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--json", "--archs", ",".join(map(str, archs))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"gpu_compile.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [Result(**r) for r in json.loads(proc.stdout)]


# ---------------------------------------------------------------------------------------------
# Report.


def format_table(results: list[Result]) -> str:
    """One line per configuration: registers and shared memory for each arch, and any problem."""
    archs = sorted({r.arch for r in results})
    by_key: dict[tuple[str, str], dict[int, Result]] = {}
    for r in results:
        by_key.setdefault((r.module, r.name), {})[r.arch] = r
    width = max([len(name) for _, name in by_key] + [6])
    head = f"{'kernel config':<{width}}  warps" + "".join(
        f" | sm_{a} REG SHARED(static+dyn) LOCAL STACK" for a in archs)
    lines = [head, "-" * len(head)]
    problems = []
    for (module, name), per_arch in by_key.items():
        warps = next(iter(per_arch.values())).num_warps
        row = f"{name:<{width}}  {warps:>5}"
        for a in archs:
            r = per_arch.get(a)
            if r is None or r.error is not None:
                row += f" | {'error':>10}{'':>31}"
            else:
                shared = f"{r.shared}+{r.dyn_shared}"
                row += f" | {r.reg:>10} {shared:>18} {r.local:>5} {r.stack:>5}"
            if r is not None and r.problem():
                problems.append(f"{module} {name} sm_{a}: {r.problem()}")
        lines.append(row)
    lines.append(f"{len(by_key)} configurations x {len(archs)} archs; {len(problems)} problems")
    lines += problems
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    results = compile_all(archs=[int(a) for a in args.archs.split(",")], jobs=args.jobs)
    if args.json:  # for run_subprocess: the verdicts travel in the results, exit 0
        print(json.dumps([asdict(r) for r in results]))
        return 0
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
