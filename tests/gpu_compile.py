"""Ahead-of-time compilation of every shipped Triton kernel configuration, for each GPU target.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` builds the
TTGIR, PTX and cubin on any machine, and the ``cuobjdump`` inside the triton wheel reads the
cubin's resources. Each configuration is compiled in two forms:

- ``jit``: what a real launch compiles. The JIT specializes every pointer that is 16-byte aligned
  and every integer divisible by 16 (``tt.divisibility = 16``), and that is what lets it emit
  vector loads and ``cp.async`` pipelines, with their own registers and shared memory. A typical
  launch (contiguous tensors from the caching allocator, sizes that are multiples of 16) gets it
  for every pointer and integer; a configuration lists the integers that are usually not
  multiples of 16 under ``"unaligned_ints"``.
- ``plain``: no specialization, what an unaligned launch compiles (sm_80 and sm_90 only: the
  Ampere-class targets compile alike). A configuration whose launcher makes every pointer 16-byte
  aligned (copying an unaligned input) never runs this form: it says ``"aligned_only": True`` and
  only its ``jit`` form is compiled.

A result fails when the configuration does not compile, spills (LOCAL > 0), keeps a stack
(STACK > 0), or needs more shared memory than the target gives one block (:data:`SHARED_LIMIT`).
Beyond resources the table shows the instruction classes that decide speed, read from the PTX
(wgmma vs mma.sync, cp.async, TMA, the widest global load), and whether a dot replicates work
across warps (read from the TTGIR). A configuration can demand some of them under ``"expect"``:

    "wgmma"            its dots use wgmma on sm_90 (jit form)
    "tensor_cores"     its dots use mma.sync or wgmma on every target
    "no_replication"   no dot's tile is smaller than its warps' tile (no warp recomputes another's)
    "vector_loads"     the jit form loads global memory 128 bits at a time somewhere
    "tf32"             its tensor-core dots read TF32 operands (mma.sync / wgmma ... .tf32)

Every module of ``kexue.triton_kernels`` that defines ``AOT_CONFIGS`` is covered; a new op family
only adds that list. Each entry is a dict:

    kernel          the @triton.jit function
    signature       {argument name: type}, e.g. "*fp32", "*bf16", "i32", "fp32", "constexpr"
    constexprs      {argument name: value} for the constexpr arguments
    num_warps       optional (default 4); num_stages optional; maxnreg optional (the launcher's
                    register budget, PTX .maxnreg)
    name            optional label for the table (default: the kernel's name)
    archs           optional: the targets the dispatcher uses it on (default: all)
    unaligned_ints  optional: integer arguments a typical launch does not make multiples of 16
    aligned_only    optional: True when the launcher guarantees 16-byte aligned pointers (the
                    plain form is never launched, so it is not compiled)
    expect          optional: see above

This module is a library (tests/test_gpu_compile.py) and a script: ``python tests/gpu_compile.py``
prints the table (``make check-gpu``) and exits non-zero on a failure. It must run without
TRITON_INTERPRET=1 (under the interpreter @triton.jit yields functions that cannot be compiled);
:func:`run_subprocess` takes care of that from a test process.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context

if not __package__:  # run as a script (python tests/gpu_compile.py): import its sibling as tests.*
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.gpu_compile_output import (  # noqa: E402
    SHARED_LIMIT,
    Result,
    count_instructions,
    cuobjdump,
    format_table,
    parse_resource_usage,
    replicated_dots,
)

# Shared memory one block may use (the opt-in maximum), by compute capability.
ARCHS = tuple(SHARED_LIMIT)
MODES = ("jit", "plain")
PLAIN_ARCHS = (80, 90)  # the unspecialized form adds nothing new on sm_86/sm_89
WARP_SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTATIONS = ("wgmma", "tensor_cores", "no_replication", "vector_loads", "tf32")


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


def discover(extra_modules: tuple[str, ...] = ()) -> list[tuple[str, int, dict]]:
    """``(module name, index, config)`` for every entry of every module's AOT_CONFIGS."""
    package = kernel_package()
    names = [
        f"{package.__name__}.{info.name}"
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name)
        if not info.name.startswith("_")
    ]
    if extra_modules and REPO not in sys.path:  # e.g. tests.gpu_compile_fixtures, run as a script
        sys.path.insert(0, REPO)
    found = []
    for name in [*names, *extra_modules]:
        module = importlib.import_module(name)
        for index, config in enumerate(getattr(module, "AOT_CONFIGS", ())):
            unknown = set(config.get("expect", ())) - set(EXPECTATIONS)
            if unknown:
                raise ValueError(f"{name} AOT_CONFIGS[{index}]: unknown expectations {sorted(unknown)}")
            if not isinstance(config.get("aligned_only", False), bool):
                raise TypeError(f"{name} AOT_CONFIGS[{index}]: aligned_only must be a bool")
            found.append((module.__name__, index, config))
    return found


def sample(configs: list[tuple[str, int, dict]]) -> list[tuple[str, int, dict]]:
    """The first and the last configuration of each kernel of each module: the quick form of the
    check that ``make test`` runs (``make check-gpu`` compiles them all). Each module lists its
    lightest configuration first and its heaviest (every switch on, widest tile) last."""
    groups: dict[tuple[str, str], list[tuple[str, int, dict]]] = {}
    for item in configs:
        groups.setdefault((item[0], item[2]["kernel"].__name__), []).append(item)
    return [x for group in groups.values() for x in ([group[0], group[-1]] if len(group) > 1 else group)]


def work_items(configs: list[tuple[str, int, dict]], archs=ARCHS, modes=MODES) -> list[tuple[str, int, int, str]]:
    """``(module, index, arch, mode)`` for each compilation: the jit form on every target the
    configuration is meant for, the plain form on :data:`PLAIN_ARCHS` among them unless the
    configuration is ``aligned_only`` (its launcher never passes an unaligned pointer)."""
    items = []
    for module, index, config in configs:
        for arch in archs:
            if arch not in config.get("archs", ARCHS):
                continue
            for mode in modes:
                if mode == "plain" and (arch not in PLAIN_ARCHS or config.get("aligned_only", False)):
                    continue
                items.append((module, index, arch, mode))
    return items


# ---------------------------------------------------------------------------------------------
# Compilation of one configuration for one target in one form.


def _fp_fusion() -> bool:
    """What a JIT launch would use (triton's default, unless disabled by the environment)."""
    from triton import knobs

    lang = knobs.language
    return bool(getattr(lang, "default_fp_fusion", True)) and not getattr(lang, "force_disable_fp_fusion", False)


def jit_attributes(config: dict) -> dict[tuple[int], list]:
    """``tt.divisibility = 16`` on every pointer and integer argument of a typical aligned launch,
    as the JIT's specialization gives them (indexed by position in the kernel's arguments)."""
    kernel = config["kernel"]
    skip = set(config.get("unaligned_ints", ()))
    attrs = {}
    for name, kind in config["signature"].items():
        if kind == "constexpr" or name in skip:
            continue
        if kind.startswith("*") or kind in ("i32", "i64", "u32", "u64"):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_config(config: dict, arch: int, module: str = "?", mode: str = "jit") -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = config["kernel"]
    num_warps = int(config.get("num_warps", 4))
    result = Result(
        module=module,
        name=config.get("name", kernel.__name__),
        arch=arch,
        num_warps=num_warps,
        mode=mode,
        expect=list(config.get("expect", ())),
    )
    options = {"num_warps": num_warps, "enable_fp_fusion": _fp_fusion()}
    if "num_stages" in config:
        options["num_stages"] = int(config["num_stages"])
    if "maxnreg" in config:
        options["maxnreg"] = int(config["maxnreg"])
    try:
        attrs = jit_attributes(config) if mode == "jit" else None
        source = triton.compiler.ASTSource(
            fn=kernel, signature=config["signature"], constexprs=config.get("constexprs", {}), attrs=attrs
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            out = subprocess.run(
                [cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
            ).stdout
        usage = parse_resource_usage(out)
        result.reg, result.stack, result.shared, result.local = (
            usage["REG"],
            usage["STACK"],
            usage["SHARED"],
            usage["LOCAL"],
        )
        result.dyn_shared = int(compiled.metadata.shared)
        result.instructions = count_instructions(compiled.asm["ptx"])
        result.replicated = replicated_dots(compiled.asm["ttgir"])
    except Exception as exc:  # reported per configuration, not raised: the table shows them all
        message = str(exc).strip().splitlines()
        result.error = f"{type(exc).__name__}: {message[-1] if message else ''}"[:300]
    return result


def _compile_job(module: str, index: int, arch: int, mode: str) -> Result:
    config = importlib.import_module(module).AOT_CONFIGS[index]
    return compile_config(config, arch, module, mode)


def compile_all(
    archs=ARCHS,
    modes=MODES,
    jobs: int | None = None,
    only: str | None = None,
    extra_modules: tuple[str, ...] = (),
    quick: bool = False,
) -> list[Result]:
    """Compile every configuration (whose module or name contains ``only``, if given; with
    ``quick``, :func:`sample`) in ``jobs`` processes (default: all cores)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset; use run_subprocess()")
    configs = [
        (m, i, c)
        for m, i, c in discover(extra_modules)
        if only is None or only in m or only in c.get("name", c["kernel"].__name__)
    ]
    if quick:
        configs = sample(configs)
    work = work_items(configs, archs, modes)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(work) <= 1:
        return [_compile_job(*w) for w in work]
    # spawn: a fresh interpreter per worker, no forked torch/OpenMP state.
    with ProcessPoolExecutor(
        jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(sys.path,)
    ) as pool:
        return list(pool.map(_compile_job, *zip(*work, strict=True)))


def _worker_init(path: list[str]) -> None:
    sys.path[:] = path


def run_subprocess(
    archs=ARCHS,
    modes=MODES,
    timeout: float = 3600,
    only: str | None = None,
    extra_modules: tuple[str, ...] = (),
    quick: bool = False,
) -> list[Result]:
    """:func:`compile_all` in a child process without TRITON_INTERPRET (for interpreter test runs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--json",
        "--archs",
        ",".join(map(str, archs)),
        "--modes",
        ",".join(modes),
    ]
    if only:
        cmd += ["--only", only]
    for module in extra_modules:
        cmd += ["--module", module]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"gpu_compile.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [Result(**r) for r in json.loads(proc.stdout)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--modes", default=",".join(MODES), help="jit, plain or both")
    parser.add_argument("--only", help="only configurations whose module or name contains this text")
    parser.add_argument("--module", action="append", default=[], help="also compile this module's AOT_CONFIGS")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="the first and last configuration of each kernel only")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if set(modes) - set(MODES):
        parser.error(f"--modes: choose from {MODES}")
    results = compile_all(
        archs=[int(a) for a in args.archs.split(",")],
        modes=modes,
        jobs=args.jobs,
        only=args.only,
        extra_modules=tuple(args.module),
        quick=args.quick,
    )
    if args.json:  # for run_subprocess: the verdicts travel in the results, exit 0
        print(json.dumps([asdict(r) for r in results]))
        return 0
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
