"""Every shipped Triton kernel configuration compiles for sm_80 and sm_90 without spilling.

Run by ``make check-gpu`` (``pytest -m gpu_compile -s`` prints the table of registers and shared
memory). No GPU is needed; see tests/gpu_compile.py. The compilation runs in a child process
because this one may run the kernels in the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest

from tests import gpu_compile

pytestmark = pytest.mark.gpu_compile


@pytest.fixture(scope="module")
def results() -> list[gpu_compile.Result]:
    pytest.importorskip("triton")
    return gpu_compile.run_subprocess()


def test_every_kernel_module_ships_configurations(results):
    modules = {r.module.rsplit(".", 1)[-1] for r in results}
    assert "entropy_norm" in modules
    assert {r.arch for r in results} == set(gpu_compile.ARCHS)


def test_no_spills_no_stack_every_config_compiles(results):
    print()
    print(gpu_compile.format_table(results))
    problems = [f"{r.name} sm_{r.arch}: {r.problem()}" for r in results if not r.ok]
    assert not problems, "\n".join(problems)


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _entropy_norm_fwd_kernel:
  REG:93 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert gpu_compile.parse_resource_usage(text) == {"REG": 93, "STACK": 0, "SHARED": 1024, "LOCAL": 0}
    with pytest.raises(ValueError, match="LOCAL"):
        gpu_compile.parse_resource_usage("REG:1 STACK:0 SHARED:0")
