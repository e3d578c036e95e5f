"""The compiler's output for tests/gpu_compile.py, read and tabulated: cubin resources (registers,
stack, shared memory, local memory) from cuobjdump, instruction counts from the PTX (global load
widths, cp.async bytes, mma / wgmma and their tf32 forms), replicated dot tiles from the TTGIR
layouts; the result of one compilation with the problems it shows, and the table ``make
check-gpu`` prints."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# Shared memory a block may use on each target (the opt-in maximum).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclass
class Result:
    module: str
    name: str
    arch: int
    num_warps: int
    mode: str = "jit"
    reg: int | None = None
    stack: int | None = None
    shared: int | None = None  # static shared memory in the cubin
    dyn_shared: int | None = None  # dynamic shared memory triton requests at launch
    local: int | None = None
    instructions: dict[str, int] = field(default_factory=dict)  # see count_instructions()
    replicated: list[str] = field(default_factory=list)  # dots whose tile is smaller than their warps' tile
    expect: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def shared_total(self) -> int:
        return (self.shared or 0) + (self.dyn_shared or 0)

    @property
    def ok(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        if self.error is not None:
            return self.error
        if self.local:
            return f"spills: LOCAL {self.local} bytes"
        if self.stack:
            return f"uses a stack: STACK {self.stack} bytes"
        limit = SHARED_LIMIT.get(self.arch)
        if limit is not None and self.shared_total > limit:
            return f"needs {self.shared_total} bytes of shared memory, sm_{self.arch} gives a block {limit}"
        return self._unmet()

    def _unmet(self) -> str | None:
        ins = self.instructions
        if "wgmma" in self.expect and self.arch == 90 and self.mode == "jit" and not ins.get("wgmma"):
            return "expected wgmma on sm_90, the PTX has none"
        if "tensor_cores" in self.expect and not (ins.get("wgmma") or ins.get("mma")):
            return "expected tensor-core dots (mma/wgmma), the PTX has none"
        if "vector_loads" in self.expect and self.mode == "jit" and not (ins.get("ld128") or ins.get("cp128")):
            return "expected 128-bit global loads (ld.global.v4 or 16-byte cp.async) in the jit form, the PTX has none"
        if "tf32" in self.expect and not ins.get("tf32"):
            return "expected TF32 tensor-core dots (mma/wgmma with .tf32 operands), the PTX has none"
        if "no_replication" in self.expect and self.replicated:
            return "dot tiles replicated across warps: " + "; ".join(self.replicated)
        return None


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


_GLOBAL_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)*)")
_VECTOR = re.compile(r"\.v(\d)\b")
_ELEMENT_BITS = re.compile(r"\.[bfsu](\d+)\b")
_CP_ASYNC_BYTES = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global[\w.:]*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)


def count_instructions(ptx: str) -> dict[str, int]:
    """Counts of the PTX instructions that decide a kernel's speed.

    ``wgmma`` (Hopper warpgroup MMA), ``mma`` (mma.sync, Ampere-style tensor cores), ``cp_async``
    (asynchronous global->shared copies), ``tma`` (bulk tensor copies), and global loads by width
    in bits (``ld128``, ``ld64``, ``ld32``, ``ld16``, ``ld8``) and cp.async copies by width (``cp128``,
    ``cp64``, ``cp32``). Static counts: a loop body counts once.
    """
    counts = {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "mma": len(re.findall(r"\bmma\.sync\b", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)),
        "tf32": len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\S*\.tf32\b", ptx)),
    }
    for size in _CP_ASYNC_BYTES.findall(ptx):  # global->shared copies are loads too: by their width
        bits = int(size, 0) * 8
        counts[f"cp{bits}"] = counts.get(f"cp{bits}", 0) + 1
    for match in _GLOBAL_LOAD.finditer(ptx):
        suffix = match.group(1)
        vector = _VECTOR.search(suffix)
        element = _ELEMENT_BITS.search(suffix)
        bits = (int(vector.group(1)) if vector else 1) * (int(element.group(1)) if element else 32)
        counts[f"ld{bits}"] = counts.get(f"ld{bits}", 0) + 1
    return counts


_LAYOUT = re.compile(r"^(#[\w]+)\s*=\s*#ttg\.nvidia_mma<\{(.*)\}>", re.MULTILINE)
_DOT = re.compile(r"(?:\btt\.dot\b|\bttng\.warp_group_dot\b).*->\s*tensor<(\d+)x(\d+)x\w+,\s*(#\w+)>")


def _int_list(text: str, key: str) -> list[int] | None:
    match = re.search(key + r"\s*=\s*\[([\d,\s]+)\]", text)
    return [int(x) for x in match.group(1).split(",")] if match else None


def replicated_dots(ttgir: str) -> list[str]:
    """Dots whose result tile is smaller than the tile its warps cover.

    Each warp of an MMA layout owns ``instrShape`` (at least 16 rows) of the result; when the
    layout spreads ``warpsPerCTA = [wm, wn]`` warps over an ``M x N`` tile with ``M < 16 * wm``
    (or ``N < instrN * wn``), several warps hold copies of the same rows and compute them twice.
    """
    layouts = {name: body for name, body in _LAYOUT.findall(ttgir)}
    found = []
    for m, n, layout in _DOT.findall(ttgir):
        body = layouts.get(layout)
        if body is None:
            continue
        warps = _int_list(body, "warpsPerCTA") or [1, 1]
        instr = _int_list(body, "instrShape") or [16, 8]
        rows, cols = int(m), int(n)
        if rows < instr[0] * warps[0] or cols < instr[1] * warps[-1]:
            found.append(f"{rows}x{cols} tile on warps {warps} (instr {instr[:2]})")
    return found


# ---------------------------------------------------------------------------------------------
# Report.


def instruction_summary(r: Result) -> str:
    """``wgmma``/``mma`` (tensor cores), ``cp.async``/``tma`` (async copies), the widest global load
    (``ld128``: ld.global.v4.b32) and the widest cp.async (``cp128``: 16 bytes a copy)."""
    ins = r.instructions
    kinds = (("wgmma", "wgmma"), ("mma", "mma"), ("tf32", "tf32"), ("tma", "tma"))
    parts = [name for key, name in kinds if ins.get(key)]
    for prefix in ("ld", "cp"):  # the widest plain load, the widest async copy
        widths = sorted((int(k[2:]) for k in ins if k.startswith(prefix) and k[2:].isdigit() and ins[k]), reverse=True)
        if widths:
            parts.append(f"{prefix}{widths[0]}")
    if r.replicated:
        parts.append(f"REPLICATED x{len(r.replicated)}")
    return " ".join(parts) or "-"


def format_table(results: list[Result]) -> str:
    """One line per (configuration, target, form): resources, instruction classes, any problem."""
    width = max([len(r.name) for r in results] + [13])
    head = (
        f"{'kernel config':<{width}} warps target mode  {'REG':>4} {'STACK':>5} {'SMEM KB':>8} "
        f"{'LIMIT':>5} {'SPILL':>5}  instructions"
    )
    lines = [head, "-" * len(head)]
    problems = []
    for r in sorted(results, key=lambda r: (r.module, r.name, r.arch, r.mode)):
        limit = SHARED_LIMIT.get(r.arch, 0) // 1024
        if r.error is not None:
            row = f"{r.name:<{width}} {r.num_warps:>5} sm_{r.arch:<3} {r.mode:<5} compile error"
        else:
            row = (
                f"{r.name:<{width}} {r.num_warps:>5} sm_{r.arch:<3} {r.mode:<5} {r.reg:>4} {r.stack:>5} "
                f"{r.shared_total / 1024:>8.1f} {limit:>5} {r.local:>5}  {instruction_summary(r)}"
            )
        if r.problem():
            row += "  <-- FAIL"
            problems.append(f"{r.module} {r.name} sm_{r.arch} {r.mode}: {r.problem()}")
        lines.append(row)
    configs = len({(r.module, r.name) for r in results})
    lines.append(f"{configs} configurations, {len(results)} compilations; {len(problems)} problems")
    lines += problems
    return "\n".join(lines)
