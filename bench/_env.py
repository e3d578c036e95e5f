"""Where the numbers came from: device, versions, threads. Stored with the run and in every row,
so that rows of different runs can be pooled and still told apart."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _git_commit() -> str | None:
    """The checked-out commit (read-only query), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def describe(device: torch.device) -> dict[str, Any]:
    """The full record, stored once per run."""
    import kexue

    return {
        **row_fields(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "cpus": os.cpu_count(),
        # Other jobs on the machine at the start of the run (1-minute average): a shared machine
        # stretches absolute times, and OpenMP-parallel ops most, since a thread waits for a core.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "kexue_backends": kexue.backends(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def row_fields(device: torch.device) -> dict[str, Any]:
    """The short record repeated in every row."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "kexue": _version("kexue"),
        "threads": torch.get_num_threads(),
    }
