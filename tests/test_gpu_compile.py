"""Every shipped Triton kernel configuration compiles for each GPU target within its resources.

No GPU is needed; see tests/gpu_compile.py. The compilation runs in a child process because this one
may run the kernels in the Triton interpreter (tests/conftest.py).

``make test`` compiles the form a real launch uses (``jit``) for sm_80 and sm_90, for the first and
the last configuration of each kernel (the whole list takes over ten minutes on two cores);
``make check-gpu`` (``python tests/gpu_compile.py``) and the slow tests here compile every
configuration, every form for every target (sm_80, sm_86, sm_89, sm_90), and print the table.
The fixtures in tests/gpu_compile_fixtures.py are built to fail, and show that each failing
condition is caught.
"""

from __future__ import annotations

import pytest

from tests import gpu_compile

pytestmark = pytest.mark.gpu_compile


def _problems(results: list[gpu_compile.Result]) -> list[str]:
    return [f"{r.module} {r.name} sm_{r.arch} {r.mode}: {r.problem()}" for r in results if not r.ok]


@pytest.fixture(scope="module")
def jit_results() -> list[gpu_compile.Result]:
    pytest.importorskip("triton")
    return gpu_compile.run_subprocess(archs=(80, 90), modes=("jit",), quick=True)


def test_every_kernel_module_ships_configurations(jit_results):
    modules = {r.module.rsplit(".", 1)[-1] for r in jit_results}
    for family in ("entropy_norm", "logn_attention", "global_pointer", "biohash", "sign_optim"):
        assert any(m.startswith(family) for m in modules), f"no AOT_CONFIGS in a {family} kernel module"
    assert {r.arch for r in jit_results} == {80, 90}


def test_jit_form_no_spills_no_stack_shared_memory_within_limits(jit_results):
    print()
    print(gpu_compile.format_table(jit_results))
    problems = _problems(jit_results)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_jit_form_of_every_configuration():
    pytest.importorskip("triton")
    problems = _problems(gpu_compile.run_subprocess(archs=(80, 90), modes=("jit",)))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_form_every_target():
    pytest.importorskip("triton")
    results = gpu_compile.run_subprocess()
    assert {r.arch for r in results} == set(gpu_compile.ARCHS)
    assert {r.mode for r in results} == set(gpu_compile.MODES)
    problems = _problems(results)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# The check itself, on kernels built to fail it.


@pytest.fixture(scope="module")
def fixtures() -> dict[tuple[str, int, str], gpu_compile.Result]:
    pytest.importorskip("triton")
    results = gpu_compile.run_subprocess(only="fixture", extra_modules=("tests.gpu_compile_fixtures",))
    return {(r.name, r.arch, r.mode): r for r in results}


def test_a_spilling_config_fails(fixtures):
    r = fixtures["fixture spills", 80, "jit"]
    assert r.error is None and (r.stack or r.local)
    assert "stack" in r.problem() or "spills" in r.problem()


def test_a_shared_memory_overflow_fails(fixtures):
    r = fixtures["fixture shared overflow", 86, "jit"]
    assert r.error is None and r.shared_total > gpu_compile.SHARED_LIMIT[86]
    assert "shared memory" in r.problem()


def test_replicated_dot_tiles_are_read_from_the_ttgir(fixtures):
    for arch in (80, 90):
        r = fixtures["fixture replicated", arch, "jit"]
        assert r.replicated and "warps [8, 1]" in r.replicated[0]
        assert "replicated" in r.problem()


def test_a_missing_wgmma_fails_when_expected(fixtures):
    r = fixtures["fixture no wgmma", 90, "jit"]
    assert r.instructions["mma"] > 0 and not r.instructions["wgmma"]
    assert "wgmma" in r.problem()


def test_a_healthy_config_passes_and_shows_its_instruction_classes(fixtures):
    sm80, sm90 = fixtures["fixture healthy", 80, "jit"], fixtures["fixture healthy", 90, "jit"]
    assert sm80.ok and sm90.ok, (sm80.problem(), sm90.problem())
    assert sm80.instructions["mma"] > 0 and sm90.instructions["wgmma"] > 0
    # The jit form copies 16 bytes at a time; without the alignment facts it cannot.
    assert sm80.instructions.get("cp128", 0) > 0
    plain = fixtures["fixture healthy", 80, "plain"]
    assert not plain.instructions.get("cp128") and not plain.instructions.get("ld128")
    table = gpu_compile.format_table(list(fixtures.values()))
    assert "wgmma" in table and "cp128" in table and "FAIL" in table


def test_an_aligned_only_config_compiles_the_jit_form_only(fixtures):
    assert fixtures["fixture aligned only", 80, "jit"].ok
    assert ("fixture aligned only", 80, "plain") not in fixtures
    assert ("fixture healthy", 80, "plain") in fixtures  # the others still get both forms


def test_work_items_skip_the_plain_form_of_aligned_only_configs():
    configs = [("m", 0, {"archs": (80, 86, 90)}), ("m", 1, {"archs": (80, 86, 90), "aligned_only": True})]
    items = gpu_compile.work_items(configs)
    assert [(i, a, m) for _, i, a, m in items if i == 0] == [
        (0, 80, "jit"),
        (0, 80, "plain"),
        (0, 86, "jit"),
        (0, 90, "jit"),
        (0, 90, "plain"),
    ]
    assert [(i, a, m) for _, i, a, m in items if i == 1] == [(1, 80, "jit"), (1, 86, "jit"), (1, 90, "jit")]


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


def test_count_instructions_reads_widths():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [ %rd2 + 0 ];
    cp.async.cg.shared.global [ %r35 + 0 ], [ %rd7 + 0 ], 0x10, %r36;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
    """
    counts = gpu_compile.count_instructions(ptx)
    assert counts["ld128"] == 1 and counts["ld16"] == 1 and counts["cp128"] == 1
    assert counts["mma"] == 1 and counts["wgmma"] == 0 and counts["cp_async"] == 1
