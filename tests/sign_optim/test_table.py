"""The step table has one definition (kexue/_sign_table.py); the C++ header and the Triton kernel
must spell the same numbers, and nothing but the oracle's tests may lean on kexue.reference."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from kexue import _sign_table as table

REPO = pathlib.Path(__file__).resolve().parents[2]
HEADER = REPO / "csrc" / "include" / "kexue" / "sign_optim.h"
# C++ names whose CamelCase does not split into the Python name.
RENAMED = {"kCm": "C_M", "kCg": "C_G", "kMm": "M_M", "kMg": "M_G", "kDMm": "D_M_M"}
HOST_ONLY = {"MASK_STREAM", "ROUND_STREAM", "TIGER_KINDS"}  # not read by any kernel


def _header_values() -> dict[str, int]:
    text = HEADER.read_text()
    values = {}
    for enum in re.finditer(r"enum (\w+) : \w+ \{(.*?)\};", text, re.S):
        for name, value in re.findall(r"\b(k\w+) = (1 << [0-9]+|[0-9]+)", enum.group(2)):
            python = RENAMED.get(name) or re.sub(r"(?<!^)(?=[A-Z])", "_", name[1:]).upper()
            values[python] = eval(value)  # "12" or "1 << 3": integer literals only (matched above)
    return values


def _table_values() -> dict[str, int]:
    return {k: v for k, v in vars(table).items() if k.isupper() and k not in HOST_ONLY}


def test_header_agrees_with_the_table_module():
    header = _header_values()
    assert len(header) > 30  # the parser found the enums
    assert header == _table_values()


def test_triton_kernel_reads_the_table_module():
    tk = pytest.importorskip("kexue.triton_kernels.sign_optim_layout")
    assert tk._T is table
    shared = [name for name in _table_values() if hasattr(tk, name)]
    assert len(shared) > 30
    assert {n: getattr(tk, n) for n in shared} == {n: getattr(table, n) for n in shared}


PRODUCT = [
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "triton_kernels").glob("sign_optim*.py"))),
    "python/kexue/ops/sign_optim.py",
    "python/kexue/ops/_sign_optim_torch.py",
    "python/kexue/_sign_table.py",
    "python/kexue/_sign_random.py",
    *(str(p.relative_to(REPO)) for p in (REPO / "python" / "kexue" / "optim").glob("*.py")),
]


@pytest.mark.parametrize("file", PRODUCT)
def test_kernels_and_optimizers_do_not_import_the_reference(file):
    """The oracle checks the product; the product must not be built on it."""
    for path in [REPO / file]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("kexue.reference"), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("kexue.reference") for a in node.names), path.name
