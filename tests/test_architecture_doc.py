"""docs/ARCHITECTURE.md, followed: a toy op family walked through the registration path it describes.

The toy family ``toy_scale_rows`` (``y = x * scale[:, None]``) is built here exactly as the guide's
"Adding an op family" section says a real family is built in python/kexue/ops/: backends registered
with :mod:`kexue._backend`, a forward and a backward ``torch.library`` custom op that each ask the
dispatcher for an implementation, fake functions, and autograd registered on the forward op. It has
a ``torch`` backend and a ``cuda`` backend that can never serve the CPU tensors used here, so the
tests can check the automatic choice, the error of a forced unavailable backend, ``opcheck`` and
gradients without depending on what is built or installed on the machine.

A second test keeps the repository self-contained: no file in it may point to files outside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kexue import _backend

OP = "toy_scale_rows"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# The toy family, laid out like python/kexue/ops/<family>.py.


def _forward_torch(x: Tensor, scale: Tensor) -> Tensor:
    return x * scale.to(x.dtype)[:, None]


def _backward_torch(grad_y: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    grad_x = grad_y * scale.to(grad_y.dtype)[:, None]
    grad_scale = (grad_y.to(scale.dtype) * x.to(scale.dtype)).sum(dim=1)
    return grad_x, grad_scale


def _never_called(*args):
    raise AssertionError("the dispatcher handed a CPU tensor to the toy family's cuda backend")


# Implementations are (forward, backward) pairs, as several real families register them.
_backend.register(OP, "torch", (_forward_torch, _backward_torch), _FLOATS)
_backend.register(OP, "cuda", (_never_called, _never_called), _FLOATS)


@torch.library.custom_op("kexue_toy::scale_rows", mutates_args=())
def scale_rows(x: Tensor, scale: Tensor) -> Tensor:
    """Rows ``x (R, n)`` times per-row factors ``scale (R,)``."""
    _, (forward, _) = _backend.select(OP, x)
    return forward(x, scale)


@scale_rows.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("kexue_toy::scale_rows_backward", mutates_args=())
def scale_rows_backward(grad_y: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_x (R, n), grad_scale (R,))``."""
    _, (_, backward) = _backend.select(OP, x)
    return backward(grad_y, x, scale)


@scale_rows_backward.register_fake
def _(grad_y, x, scale):
    return torch.empty_like(x), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, scale = inputs
    ctx.save_for_backward(x, scale)


def _backward(ctx, grad_y):
    x, scale = ctx.saved_tensors
    return scale_rows_backward(grad_y.contiguous(), x, scale)


scale_rows.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The registration path.


@pytest.fixture(autouse=True)
def _automatic_choice(monkeypatch):
    """Start every test from the automatic choice, whatever the environment forces."""
    monkeypatch.delenv("KEXUE_BACKEND", raising=False)


def _rows(dtype=torch.float32, requires_grad=False):
    x = torch.randn(5, 7, dtype=dtype, requires_grad=requires_grad)
    scale = (torch.rand(5, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    return x, scale


def test_automatic_choice_picks_the_available_backend():
    x, scale = _rows()
    why = _backend.reasons(OP, x)
    assert why["torch"] is None
    assert why["cuda"] is not None  # CPU tensors are never served by the CUDA path
    assert why["triton"] == f"{OP} has no triton implementation"
    assert why["cpu"] == f"{OP} has no cpu implementation"
    name, impl = _backend.select(OP, x)
    assert name == "torch"
    assert impl == (_forward_torch, _backward_torch)
    torch.testing.assert_close(scale_rows(x, scale), x * scale[:, None], rtol=0, atol=0)


def test_dtype_outside_the_registration_is_a_reason():
    x = torch.ones(2, 3, dtype=torch.int32)
    assert "not torch.int32" in _backend.reasons(OP, x)["torch"]
    with pytest.raises(_backend.BackendUnavailableError, match="no backend can serve toy_scale_rows"):
        _backend.select(OP, x)


def _assert_names_every_reason(message: str, x: Tensor) -> None:
    for name, why in _backend.reasons(OP, x).items():
        assert f"{name}: {why or 'available'}" in message


def test_forcing_an_unavailable_backend_names_every_backends_reason():
    x, scale = _rows()
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailableError) as info:
        scale_rows(x, scale)
    message = str(info.value)
    assert "'cuda' was forced" in message and OP in message
    _assert_names_every_reason(message, x)


def test_kexue_backend_variable_forces_like_use_backend(monkeypatch):
    x, scale = _rows()
    monkeypatch.setenv("KEXUE_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailableError) as info:
        scale_rows(x, scale)
    _assert_names_every_reason(str(info.value), x)
    monkeypatch.setenv("KEXUE_BACKEND", "torch")
    torch.testing.assert_close(scale_rows(x, scale), x * scale[:, None], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, scale = _rows(dtype, requires_grad=True)
    torch.library.opcheck(scale_rows, (x, scale))
    grad_y = torch.randn_like(x)
    torch.library.opcheck(scale_rows_backward, (grad_y, x.detach(), scale.detach()))


def test_gradients_flow_to_both_inputs():
    x, scale = _rows(torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scale_rows, (x, scale))
    grad_y = torch.randn_like(x)
    grad_x, grad_scale = torch.autograd.grad(scale_rows(x, scale), (x, scale), grad_y)
    torch.testing.assert_close(grad_x, grad_y * scale.detach()[:, None])
    torch.testing.assert_close(grad_scale, (grad_y * x.detach()).sum(dim=1))


# --------------------------------------------------------------------------------------------
# No reference to files outside the repository.

ROOT = Path(__file__).resolve().parents[1]
SCANNED = (
    ".ci",
    "examples",
    "requirements",
    "python",
    "triton_kernels",
    "csrc",
    "tests",
    "bench",
    "docs",
    "README.md",
    "Makefile",
    "setup.py",
    "pyproject.toml",
)
# Built from pieces so that this file does not match itself.
OUTSIDE = ("shared" + "/spec", "DESIGN" + ".md", ".." + "/shared", "anchors" + ".md")
# Files not read: build outputs and images (any other file that is not UTF-8 text is skipped too).
_BINARY_SUFFIXES = {".so", ".pyd", ".pyc", ".o", ".png", ".jpg", ".pt"}


def _text_files():
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                # Skipped: caches, hidden folders, and egg-info (a stale copy of the README).
                dirnames[:] = [
                    d for d in dirnames if d != "__pycache__" and not d.startswith(".") and not d.endswith(".egg-info")
                ]
                for filename in filenames:
                    file = Path(dirpath) / filename
                    if file.suffix not in _BINARY_SUFFIXES:
                        yield file


def _outside_references(files, root: Path) -> list[str]:
    """``path:line: needle`` for every line of ``files`` that names a file outside the repository."""
    found = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            for needle in OUTSIDE:
                if needle in line:
                    found.append(f"{file.relative_to(root)}:{number}: {needle}")
    return found


def test_the_scan_finds_a_planted_reference(tmp_path):
    clean, planted = tmp_path / "clean.py", tmp_path / "planted.md"
    clean.write_text("# the math is in docs/entropy_norm.md\n")
    planted.write_text("intro\nsee " + OUTSIDE[1] + " for the design\n")
    assert _outside_references([clean, planted], tmp_path) == [f"planted.md:2: {OUTSIDE[1]}"]


def test_no_reference_to_files_outside_the_repository():
    files = list(_text_files())
    assert any(f.name == "ARCHITECTURE.md" for f in files)  # the walk reaches docs/
    found = _outside_references(files, ROOT)
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# Layering: the oracle is for tests and the torch backend, not for kernels or product code.

LEAN_ON_NOTHING = ("triton_kernels", "python/kexue/optim", "python/kexue/flyvec", "python/kexue/nn")


def _reference_imports(path: Path) -> list[str]:
    """The ``kexue.reference`` imports of one module (absolute, or relative from inside kexue)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        if any(n.startswith("kexue.reference") or n.lstrip(".").startswith("reference") for n in names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_import_scan_finds_a_planted_reference_import(tmp_path, monkeypatch):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nfrom kexue.reference.biohash import pack_bits\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _reference_imports(planted) == ["planted.py:2"]


def test_kernels_and_product_code_do_not_import_the_reference():
    files = [p for d in LEAN_ON_NOTHING for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, "the scan must see the kernel and product modules"
    found = [hit for p in files for hit in _reference_imports(p)]
    assert not found, "modules that lean on kexue.reference:\n" + "\n".join(found)
