"""Shared test setup: Triton kernels run in the interpreter when there is no GPU.

Without a CUDA device, ``TRITON_INTERPRET=1`` is set here, at import time, before any test module
imports triton or a kernel module (``@triton.jit`` reads it when a kernel is decorated). The
Triton backend then serves CPU tensors, so the ordinary ``pytest`` run executes every Triton kernel
on the CPU (docs/ARCHITECTURE.md, "Verifying kernels without a GPU"). An explicit
``TRITON_INTERPRET`` in the environment is left as it is.

Ahead-of-time GPU compilation cannot run under the interpreter; tests/gpu_compile.py runs it in a
child process without the variable.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        # Too late for kernels already decorated; say so instead of failing obscurely later.
        import warnings

        warnings.warn("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1", stacklevel=1)
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    # The interpreter evaluates kernels with numpy, which warns on the IEEE arithmetic the kernels
    # rely on and then mask (0/0 and inf - inf on empty or padded rows, log 0 = -inf).
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run in this process (None: they can, on DEVICE)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a test dependency
        return f"triton failed to import: {exc}"
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device and TRITON_INTERPRET is not 1"
    return None


@pytest.fixture
def triton_device() -> torch.device:
    """Where the Triton kernels run: CUDA when present, else CPU tensors under the interpreter.
    Skips the test where they cannot run at all."""
    reason = triton_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return DEVICE


@pytest.fixture
def use_backend():
    """``use_backend(name)`` forces a kexue backend for the rest of the test; undone afterwards.

    Plain ``with kexue.use_backend(name):`` works too; the fixture suits parametrized tests.
    """
    import kexue

    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(kexue.use_backend(name))


@pytest.fixture
def triton_backend(triton_device, use_backend):
    """Route kexue ops through the Triton backend for the test; returns the device it serves."""
    use_backend("triton")
    return triton_device


@pytest.fixture
def nan_empty():
    """``torch.empty`` returns NaN-filled memory (deterministic mode) for the test, so an output
    element a kernel forgets to write shows up as NaN. Use with
    ``pytestmark = pytest.mark.usefixtures("nan_empty")``."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)
