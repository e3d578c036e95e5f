"""``python -m kexue.env``: versions, the native build, the CPU code path, and the backend each op uses here.

Most bug reports about kernel packages are version or build mismatches; this prints what is
needed to diagnose one in a single command.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

import kexue
from kexue import _backend

# The C++ CPU kernels are compiled several times with GCC's target_clones (csrc/cpu/simd.h): each
# clone's symbol ends in ".arch_<level>", and at load time the dynamic loader picks the widest one
# that the processor supports. The CPU features GCC's resolver checks for each level:
CPU_LEVELS = (
    ("x86_64_v4", "AVX-512", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86_64_v3", "AVX2+FMA", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
)
BASELINE = "baseline (SSE2)"


def cpu_flags() -> set[str] | None:
    """The processor's feature flags (/proc/cpuinfo), or None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def compiled_levels(path: str) -> list[str]:
    """The code paths a native module file holds clones for (names from :data:`CPU_LEVELS`), widest first."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    return [name for level, name, _ in CPU_LEVELS if f".arch_{level}".encode() in data]


def cpu_code_path(path: str, flags: set[str] | None) -> tuple[str, str, str]:
    """``(compiled for, the CPU supports, in use)``: what the module holds, what the processor can
    run, and so the clone the loader picks (the widest level in both)."""
    compiled = compiled_levels(path)
    if flags is None:
        return ", ".join(compiled + [BASELINE]), "unknown (no /proc/cpuinfo)", "unknown"
    supported = [name for _, name, needs in CPU_LEVELS if needs <= flags]
    in_use = next((name for name in compiled if name in supported), BASELINE)
    return ", ".join(compiled + [BASELINE]), ", ".join(supported + [BASELINE]), in_use


def cuda_build_note(torch_cuda: str | None) -> str:
    """Why a native module has no CUDA kernels, from what the build needed (it does not record
    which condition failed; the build's own output printed that)."""
    if torch_cuda is None:
        return "the installed torch has no CUDA (a CPU wheel), so setup.py built the CPU sources only"
    return (
        "setup.py builds them only when torch has CUDA, nvcc is found and the GPU architectures are "
        "known: a GPU visible at build time, or TORCH_CUDA_ARCH_LIST set (e.g. '8.0;9.0'); reinstall "
        "with `TORCH_CUDA_ARCH_LIST=... pip install --no-build-isolation .` to add them"
    )


def _native_lines() -> list[str]:
    native = _backend.native()
    if native is None:
        return [
            f"kexue._C          not loaded: {_backend._native_error}",
            "                  (every op runs on the torch reference; rebuild with "
            "`pip install --no-build-isolation .`)",
        ]
    path = native.__file__
    built = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    with_cuda = getattr(native, "WITH_CUDA", False)
    lines = [
        f"kexue._C          loaded from {path}",
        f"  built           {built:%Y-%m-%d %H:%M} UTC (the file's time), CUDA kernels: {'yes' if with_cuda else 'no'}",
    ]
    if not with_cuda:
        lines.append(f"    no CUDA       {cuda_build_note(torch.version.cuda)}")
    if platform.machine() in ("x86_64", "AMD64"):
        compiled, supported, in_use = cpu_code_path(path, cpu_flags())
        lines += [
            f"  CPU code path   {in_use}",
            f"    compiled for  {compiled}",
            f"    CPU supports  {supported}",
        ]
    else:
        lines.append(f"  CPU code path   {platform.machine()}: the compiler's default (no x86 clones)")
    return lines


def report() -> str:
    lines = [
        f"kexue             {kexue.__version__} ({os.path.dirname(kexue.__file__)})",
        f"python            {platform.python_version()} ({platform.machine()})",
        f"torch             {torch.__version__} (CUDA {torch.version.cuda}, devices: {torch.cuda.device_count()})",
        f"threads           {torch.get_num_threads()}",
    ]
    try:
        import triton

        lines.append(f"triton            {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report whatever went wrong
        lines.append(f"triton            not importable: {exc}")
    lines += _native_lines()
    forced = _backend.forced()
    lines.append(f"forced backend    {forced or 'none (KEXUE_BACKEND unset)'}")
    lines.append("backends:")
    native = _backend.native()
    for name, info in kexue.backends().items():
        reason = str(info["reason"])
        # with a CUDA torch the module could have had CUDA kernels: say what the build needed
        if name == "cuda" and torch.version.cuda and native is not None and not getattr(native, "WITH_CUDA", False):
            reason += f"; {cuda_build_note(torch.version.cuda)}"
        lines.append(f"  {name:7s} {'available' if info['available'] else 'unavailable: ' + reason}")
    lines.append("the backend each op chooses (float32 tensors, or the op's own dtype when it takes no float32):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append(f"  {'op':22s} {'tensor device':13s} -> chosen backend")
    for op, impls in sorted(_backend._REGISTRY.items()):
        dtypes = [d for impl in impls.values() for d in impl.dtypes]
        dtype = torch.float32 if torch.float32 in dtypes else dtypes[0]  # e.g. uint8 codes for Hamming search
        for device in devices:
            probe = torch.empty(0, device=device, dtype=dtype)
            try:
                chosen, _ = _backend.select(op, probe)
            except _backend.BackendUnavailableError as exc:
                chosen = f"none ({exc})"
            lines.append(f"  {op:22s} {device:13s} -> {chosen}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
