"""Which implementation serves a call: ``triton``, ``cuda``, ``cpu`` (the C++ module) or ``torch``.

Each op family registers the backends it has (:func:`register`), each with the dtypes it takes
and, optionally, a ``supports`` rule for what else it needs of a call (a head size, a rank). Once
per call, :func:`select` asks every backend (device, dtype, ``supports``) and picks the first in
order of preference that can serve it; ``KEXUE_BACKEND`` (read on every call) or
:func:`use_backend` forces one, and a backend that cannot serve the call raises
:class:`BackendUnavailableError` with every backend's reason. No family re-routes after this.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

NAMES = ("triton", "cuda", "cpu", "torch")
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# Per-op exceptions to _PREFERENCE, set with prefer(): an op whose CUDA C++ kernel was measured
# faster than its Triton one on a GPU lists "cuda" first. Only the order changes; every backend's
# reason still decides whether it can serve the call.
_OP_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot serve this call."""


# --------------------------------------------------------------------------------------------
# What is installed. Each probe runs once and remembers why a backend is missing.


def _probe_native():
    try:
        return importlib.import_module("kexue._C"), None
    except Exception as exc:  # an ImportError, or an undefined symbol from an ABI mismatch
        return None, f"kexue._C failed to import: {type(exc).__name__}: {exc}"


def _probe_triton():
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton failed to import: {type(exc).__name__}: {exc}"
    return True, None


_native, _native_error = _probe_native()
_triton_ok, _triton_error = _probe_triton()
if _native is None:
    warnings.warn(
        f"{_native_error}. kexue falls back to the torch reference on CPU (run `python -m kexue.env` for details).",
        RuntimeWarning,
        stacklevel=2,
    )


def native():
    """The compiled module ``kexue._C``, or None."""
    return _native


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device``, or None if it can."""
    if name == "torch":
        return None
    if name == "cpu":
        if _native is None:
            return _native_error
        return None if device.type == "cpu" else f"the C++ CPU path serves CPU tensors, not {device.type}"
    if name == "cuda":
        if _native is None:
            return _native_error
        if not getattr(_native, "WITH_CUDA", False):
            return (
                "kexue._C was built without CUDA (torch without CUDA, nvcc not found, or neither a visible GPU"
                " nor TORCH_CUDA_ARCH_LIST at build time)"
            )
        return None if device.type == "cuda" else f"the CUDA path serves CUDA tensors, not {device.type}"
    if name == "triton":
        if not _triton_ok:
            return _triton_error
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreting():
            return None
        return f"triton serves CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")


# --------------------------------------------------------------------------------------------
# Registry of implementations per op family.


def _serves_everything(*_args) -> None:
    return None


@dataclass(frozen=True)
class Impl:
    fn: Callable
    dtypes: tuple[torch.dtype, ...]
    # supports(tensor, *args) -> None (it can serve the call) or the reason it cannot
    supports: Callable[..., str | None] = _serves_everything


_REGISTRY: dict[str, dict[str, Impl]] = {}


def register(
    op: str,
    backend: str,
    fn: Callable,
    dtypes: tuple[torch.dtype, ...],
    supports: Callable[..., str | None] | None = None,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` for ``dtypes``.

    ``supports(tensor, *args)`` receives what :func:`select` received and returns None when the
    backend can serve that call, else the reason it cannot (default: it serves every call on its
    device and dtypes).
    """
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {NAMES}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, dtypes, supports or _serves_everything)


def prefer(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Try ``order``'s backends first, in that order, for ``op`` on ``device_type`` tensors; the
    backends it leaves out follow in the default order."""
    unknown = [b for b in order if b not in NAMES]
    if unknown:
        raise ValueError(f"order names unknown backends {unknown}; expected some of {NAMES}")
    default = _PREFERENCE.get(device_type, ("torch",))
    _OP_PREFERENCE[(op, device_type)] = tuple(order) + tuple(b for b in default if b not in order)


def preference(op: str, device_type: str) -> tuple[str, ...]:
    """The order in which automatic choice tries the backends for ``op`` on ``device_type``."""
    return _OP_PREFERENCE.get((op, device_type), _PREFERENCE.get(device_type, ("torch",)))


def reasons(op: str, tensor: torch.Tensor, *args) -> dict[str, str | None]:
    """For every backend, why it cannot serve ``op`` on ``tensor`` (None: it can)."""
    impls = _REGISTRY.get(op, {})
    out: dict[str, str | None] = {}
    for name in NAMES:
        impl = impls.get(name)
        if impl is None:
            out[name] = f"{op} has no {name} implementation"
            continue
        why = _device_reason(name, tensor.device)
        if why is None and tensor.dtype not in impl.dtypes:
            why = f"{name} {op} supports {', '.join(str(d) for d in impl.dtypes)}, not {tensor.dtype}"
        if why is None:
            why = impl.supports(tensor, *args)
        out[name] = why
    return out


# Process-wide, not thread-local: autograd runs CUDA backward passes on its own device threads,
# and the forced choice must reach them too.
_forced_name: str | None = None


def forced() -> str | None:
    """The backend forced by :func:`use_backend` or ``KEXUE_BACKEND``, or None."""
    name = _forced_name or os.environ.get("KEXUE_BACKEND") or None
    if name is not None and name not in NAMES:
        raise ValueError(f"KEXUE_BACKEND={name!r} is not a backend; expected one of {NAMES}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for calls made inside the block, in every thread (None: automatic choice)."""
    if name is not None and name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    global _forced_name
    previous = _forced_name
    _forced_name = name
    try:
        yield
    finally:
        _forced_name = previous


def select(op: str, tensor: torch.Tensor, *args) -> tuple[str, Callable]:
    """The backend that serves ``op`` on ``tensor``: ``(name, implementation)``. ``args`` go to the
    backends' ``supports`` rules with ``tensor``."""
    why = reasons(op, tensor, *args)
    name = forced()
    if name is not None:
        if why[name] is not None:
            detail = "; ".join(f"{b}: {r or 'available'}" for b, r in why.items())
            raise BackendUnavailableError(f"backend {name!r} was forced but cannot serve {op} ({detail})")
        return name, _REGISTRY[op][name].fn
    for candidate in preference(op, tensor.device.type):
        if why[candidate] is None:
            return candidate, _REGISTRY[op][candidate].fn
    detail = "; ".join(f"{b}: {r}" for b, r in why.items())
    raise BackendUnavailableError(f"no backend can serve {op} on {tensor.device} {tensor.dtype} ({detail})")


def backends() -> dict[str, dict[str, object]]:
    """What is available: for each backend, ``{"available": bool, "reason": str | None}``.

    ``cpu`` and ``torch`` are judged for CPU tensors, ``triton`` and ``cuda`` for CUDA tensors.
    """
    devices = {"triton": "cuda", "cuda": "cuda", "cpu": "cpu", "torch": "cpu"}
    out = {}
    for name in NAMES:
        why = _device_reason(name, torch.device(devices[name]))
        if why is None and devices[name] == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device is visible to torch"
        out[name] = {"available": why is None, "reason": why}
    return out
