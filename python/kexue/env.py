"""``python -m kexue.env``: versions, the native build, and the backend each op uses here.

Most bug reports about kernel packages are version or build mismatches; this prints what is
needed to diagnose one in a single command.
"""

from __future__ import annotations

import platform

import torch

import kexue
from kexue import _backend


def report() -> str:
    lines = [
        f"kexue      {kexue.__version__}",
        f"python     {platform.python_version()} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda}, devices: {torch.cuda.device_count()})",
        f"threads    {torch.get_num_threads()}",
    ]
    try:
        import triton

        lines.append(f"triton     {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report whatever went wrong
        lines.append(f"triton     not importable: {exc}")
    native = _backend.native()
    if native is None:
        lines.append(f"kexue._C   not loaded: {_backend._native_error}")
    else:
        lines.append(f"kexue._C   loaded from {native.__file__} (CUDA: {getattr(native, 'WITH_CUDA', False)})")
    forced = _backend.forced()
    lines.append(f"forced     {forced or 'none (KEXUE_BACKEND unset)'}")
    lines.append("backends:")
    for name, info in kexue.backends().items():
        lines.append(f"  {name:7s} {'available' if info['available'] else 'unavailable: ' + str(info['reason'])}")
    lines.append("op backends (for float32 tensors, or the op's own dtype when it takes no float32):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op, impls in sorted(_backend._REGISTRY.items()):
        dtypes = [d for impl in impls.values() for d in impl.dtypes]
        dtype = torch.float32 if torch.float32 in dtypes else dtypes[0]  # e.g. uint8 codes for Hamming search
        for device in devices:
            probe = torch.empty(0, device=device, dtype=dtype)
            try:
                chosen, _ = _backend.select(op, probe)
            except _backend.BackendUnavailableError as exc:
                chosen = f"none ({exc})"
            lines.append(f"  {op:22s} {device:5s} -> {chosen}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
