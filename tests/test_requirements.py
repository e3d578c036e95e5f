"""Dependencies by purpose: what the tests import is in the test extra, or the test skips without it.

``make test`` installs requirements/test.txt (and torch, triton, the build tools); the packages
kexue is benchmarked against are in requirements/bench.txt only. A test that compares against
one of them must ``pytest.importorskip`` it, so that a checkout without the bench extra skips
that test with a reason instead of failing.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {"torch", "numpy", "triton", "setuptools", "pybind11"}  # installed before the test extra
LOCAL = {
    "kexue",
    "tests",
    "bench",
    "conftest",
    "helpers",
    "sign_optim_helpers",
    "gpu_compile",
    "gpu_compile_fixtures",
    "gpu_compile_output",
}
IMPORT_NAMES = {"lion-pytorch": "lion_pytorch", "pytorch-optimizer": "pytorch_optimizer"}


def requirements(name: str) -> set[str]:
    lines = (ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
    names = {re.split(r"[<>=!~\[ ]", line.strip())[0] for line in lines if line.strip() and not line.startswith("#")}
    return {IMPORT_NAMES.get(n, n).replace("-", "_") for n in names}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level modules ``path`` imports, and those it imports through ``pytest.importorskip``."""
    tree = ast.parse(path.read_text())
    direct, skipped = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            direct |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            direct.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            skipped.add(node.args[0].value.split(".")[0])
    return direct, skipped


def test_every_test_import_is_in_the_test_extra_or_skipped():
    test_reqs = requirements("test")
    missing = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        direct, skipped = imports(path)
        third_party = direct - set(sys.stdlib_module_names) - BASE - LOCAL - skipped
        if third_party - test_reqs:
            missing[path.name] = sorted(third_party - test_reqs)
    assert not missing, f"imported by tests but not in requirements/test.txt (nor importorskip'd): {missing}"


def test_bench_peers_are_not_test_requirements_and_their_tests_skip():
    peers = requirements("bench") - {"matplotlib", "tqdm"}  # the plots and the progress bar serve both
    assert {"lion_pytorch", "pytorch_optimizer", "flyvec"} <= peers
    assert not peers & requirements("test")
    for path in sorted((ROOT / "tests").rglob("*.py")):
        direct, skipped = imports(path)
        assert not (direct & peers) - skipped, f"{path.name} imports a bench peer without importorskip"


def test_setup_extras_come_from_the_requirement_files():
    text = (ROOT / "setup.py").read_text()
    assert '"test": _requirements("test")' in text and '"bench": _requirements("bench")' in text
    assert "ruff==" in (ROOT / "requirements" / "test.txt").read_text()  # pinned: lint results do not drift
