"""Instruction counts of the tiled log-n attention kernels, read from the SASS of their object file;
fails when a kernel lost what makes it fast or spills to local memory.

    python .ci/sass_counts.py OBJECT CUOBJDUMP
    python .ci/sass_counts.py OBJECT CUOBJDUMP --sign-optim    (csrc/cuda/sign_optim.cu, see below)

Per kernel and architecture: HMMA (tensor-core mma.sync), LDGSTS (cp.async), LDSM (ldmatrix),
FFMA, MUFU.EX2, BAR.SYNC and local loads / stores (LDL / STL). The float16 and bfloat16 kernels
must use HMMA, LDSM and LDGSTS, the float32 ones LDGSTS, and no kernel may touch local memory.
Run by .ci/check-cuda after the build (docs/logn_attention.md, "The CUDA C++ kernels").
"""

from __future__ import annotations

import re
import subprocess
import sys

COUNTS = {
    "HMMA": r"\bHMMA\.16816",
    "LDGSTS": r"\bLDGSTS\b",
    "LDSM": r"\bLDSM\b",
    "FFMA": r"\bFFMA\b",
    "EX2": r"\bMUFU\.EX2\b",
    "BAR": r"\bBAR\.SYNC\b",
    "LDL/STL": r"\b(?:LDL|STL)\b",
}


def kernels(sass: str):
    """(arch, mangled name, body) for each function of a cuobjdump -sass listing."""
    arch = "?"
    for part in re.split(r"\n(?=\s*(?:arch = |Function : ))", sass):
        head = part.strip()
        if head.startswith("arch = "):
            arch = head.split()[2]
        elif head.startswith("Function : "):
            yield arch, head.split()[2], part


def counted(obj: str, cuobjdump: str, counts: dict, strip: str) -> list:
    """(demangled name less ``strip``, arch, {count name: occurrences}) per kernel of ``obj``."""
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    rows = []
    for arch, name, body in kernels(sass):
        pretty = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        pretty = re.sub(strip, "", pretty).split("(")[0]
        rows.append((pretty, arch, {k: len(re.findall(p, body)) for k, p in counts.items()}))
    return rows


def failures(rows: list, counts: dict, needs, column: int, zero: tuple = ("LDL/STL",)) -> list:
    """Prints the table of ``rows`` and returns the kernels that miss a count ``needs(name)`` asks
    for or have any of the counts ``zero`` (local memory, by default)."""
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel':<{width}}  arch   " + " ".join(f"{k:>{column}}" for k in counts))
    bad = []
    for name, arch, c in sorted(rows):
        print(f"{name:<{width}}  {arch:<6} " + " ".join(f"{c[k]:>{column}}" for k in counts))
        if any(c[k] == 0 for k in needs(name)) or any(c[k] for k in zero):
            bad.append(f"{name} ({arch})")
    return bad


def tiled_needs(name: str) -> tuple:
    sixteen = "__half" in name or "__nv_bfloat16" in name
    return ("HMMA", "LDSM", "LDGSTS") if sixteen else ("LDGSTS",)


def main(obj: str, cuobjdump: str) -> int:
    rows = counted(obj, cuobjdump, COUNTS, r"^void |\(anonymous namespace\)::|kexue::logn_attention::tiled::")
    if not rows:
        sys.exit(f"sass_counts: no kernels in {obj}")
    bad = failures(rows, COUNTS, tiled_needs, 7)
    if bad:
        sys.exit("sass_counts: FAILED: missing HMMA/LDSM/LDGSTS or local memory in " + ", ".join(bad))
    print(f"sass_counts: {len(rows)} tiled kernel builds: tensor cores and cp.async where required, no local memory")
    return 0


# The sign-optimizer step (csrc/cuda/sign_optim.cu, docs/sign_optim.md): 128-bit global loads and
# stores of the tensors (LDG.E.128 / STG.E.128) against the scalar ones that unaligned tensors and
# tails take (LDG / STG other than 128-bit, less the .CONSTANT reads of the job and item tables).
# Every step_kernel must load and store 128 bits, every prepass_kernel load them; none may touch
# local memory. Nor may any of them flush subnormals: setup.py builds with --use_fast_math
# (-ftz=true), and the step's float32 arithmetic goes through csrc/include/kexue/ieee_float.h so
# that it keeps subnormals as the CPU step does; an instruction with .FTZ (FADD.FTZ, FFMA.FTZ,
# FSETP.GT.FTZ ...) means some float operation bypassed it. Exempt: the F2I.FTZ...TRUNC of the
# compiler's own integer division (a float reciprocal estimate truncated to an integer), which
# no subnormal reaches.
SIGN_COUNTS = {
    "LDG.128": r"\bLDG\.E\.128\b",
    "STG.128": r"\bSTG\.E\.128\b",
    "LDG other": r"\bLDG\.E(?!\.128\b)(?![.\w]*CONSTANT)[.\w]*",
    "STG other": r"\bSTG\.E(?!\.128\b)[.\w]*",
    "LDL/STL": r"\b(?:LDL|STL)\b",
    "FTZ": r"\b(?!F2I(?:\.\w+)*\.TRUNC\b)[A-Z][A-Z0-9]*(?:\.\w+)*\.FTZ\b",
}
SIGN_NEEDS = {"step_kernel": ("LDG.128", "STG.128"), "prepass_kernel": ("LDG.128",)}
STORAGE = {"0": "f32", "1": "bf16", "2": "f16"}


def sign_needs(name: str) -> tuple:
    return SIGN_NEEDS.get(name.split("<")[0], ())


def storage_names(args: str) -> str:
    return ", ".join(STORAGE[x.strip()] for x in args.split(","))


def sign_optim(obj: str, cuobjdump: str) -> int:
    rows = [
        (re.sub(r"<([\d, ]+)>", lambda m: "<" + storage_names(m[1]) + ">", name), arch, c)  # <0, 1> -> <f32, bf16>
        for name, arch, c in counted(obj, cuobjdump, SIGN_COUNTS, r"^void |\(anonymous namespace\)::|kexue::")
    ]
    if not any(name.startswith("step_kernel") for name, _, _ in rows):
        sys.exit(f"sass_counts: no sign-optimizer step kernels in {obj}")
    bad = failures(rows, SIGN_COUNTS, sign_needs, 9, zero=("LDL/STL", "FTZ"))
    if bad:
        sys.exit(
            "sass_counts: FAILED: missing 128-bit global loads/stores, local memory or .FTZ float instructions in "
            + ", ".join(bad)
        )
    print(
        f"sass_counts: {len(rows)} sign-optimizer kernel builds: 128-bit accesses where required, no local memory,"
        " no .FTZ"
    )
    return 0


if __name__ == "__main__":
    if "--sign-optim" in sys.argv:
        sys.exit(sign_optim(*[a for a in sys.argv[1:] if a != "--sign-optim"][:2]))
    sys.exit(main(*sys.argv[1:3]))
