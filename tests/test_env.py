"""``python -m kexue.env``: labelled columns, the CPU code path the native module runs, where it was loaded from."""

from __future__ import annotations

import subprocess
import sys

from kexue import _backend, env

V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


def test_cpu_code_path_is_the_widest_level_both_have(tmp_path):
    both = tmp_path / "both.so"
    both.write_bytes(b"\0_ZN5kexue3addEPf.arch_x86_64_v4\0_ZN5kexue3addEPf.arch_x86_64_v3\0")
    only_v3 = tmp_path / "v3.so"
    only_v3.write_bytes(b"\0_ZN5kexue3addEPf.arch_x86_64_v3\0")
    plain = tmp_path / "plain.so"
    plain.write_bytes(b"\0_ZN5kexue3addEPf\0")
    assert env.cpu_code_path(str(both), V3 | V4 | {"sse2"}) == (
        "AVX-512, AVX2+FMA, baseline (SSE2)",
        "AVX-512, AVX2+FMA, baseline (SSE2)",
        "AVX-512",
    )
    assert env.cpu_code_path(str(both), V3)[2] == "AVX2+FMA"  # a CPU without AVX-512
    assert env.cpu_code_path(str(both), V3 - {"fma"})[2] == "baseline (SSE2)"  # AVX2 without FMA is not v3
    assert env.cpu_code_path(str(only_v3), V3 | V4)[2] == "AVX2+FMA"  # built without the AVX-512 clone
    assert env.cpu_code_path(str(plain), V3 | V4)[2] == "baseline (SSE2)"
    assert env.cpu_code_path(str(both), None)[2] == "unknown"


def test_report_labels_its_columns_and_names_the_module():
    text = env.report()
    assert "op                     tensor device -> chosen backend" in text
    assert "  entropy_normalize      cpu           -> " in text
    native = _backend.native()
    if native is not None:
        assert f"loaded from {native.__file__}" in text and "CPU code path" in text
        if env.cpu_flags() is not None and "x86_64" in native.__file__:
            # the module built here holds the clones simd.h asks for
            assert "compiled for  AVX-512, AVX2+FMA, baseline (SSE2)" in text
    else:
        assert "not loaded" in text


def test_module_runs():
    out = subprocess.run([sys.executable, "-m", "kexue.env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "chosen backend" in out.stdout
