"""``python -m kexue.env``: labelled columns, the CPU code path the native module runs, where it was loaded from."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from kexue import _backend, env

ROOT = Path(__file__).resolve().parent.parent

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


def test_no_cuda_kernels_are_explained(monkeypatch):
    assert "CPU wheel" in env.cuda_build_note(None)
    note = env.cuda_build_note("12.4")
    assert "TORCH_CUDA_ARCH_LIST" in note and "GPU visible" in note and "nvcc" in note
    native = _backend.native()
    if native is None or getattr(native, "WITH_CUDA", False):
        return  # the report's lines below are about a module built without CUDA kernels
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # as under a CUDA torch on a machine without a GPU
    text = env.report()
    (cuda_line,) = [line for line in text.splitlines() if line.startswith("  cuda ")]
    assert "unavailable" in cuda_line and "TORCH_CUDA_ARCH_LIST" in cuda_line
    assert f"no CUDA       {note}" in text


def fake_torch(cuda: str | None, gpus: int) -> SimpleNamespace:
    return SimpleNamespace(version=SimpleNamespace(cuda=cuda), cuda=SimpleNamespace(device_count=lambda: gpus))


def test_setup_builds_cuda_sources_only_for_known_architectures(monkeypatch):
    """setup.py's decision: with nvcc but neither a visible GPU nor TORCH_CUDA_ARCH_LIST, torch's
    extension builder has no architecture to compile for and failed midway; it now skips CUDA."""
    want_cuda = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")["_want_cuda"]
    home = "/usr/local/cuda"
    assert want_cuda(fake_torch("12.4", 0), {}, home)[0] is False
    assert "TORCH_CUDA_ARCH_LIST" in want_cuda(fake_torch("12.4", 0), {}, home)[1]
    assert want_cuda(fake_torch("12.4", 0), {"TORCH_CUDA_ARCH_LIST": "native"}, home)[0] is False
    assert want_cuda(fake_torch("12.4", 0), {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, home) == (
        True,
        "torch CUDA 12.4, TORCH_CUDA_ARCH_LIST=8.0;9.0",
    )
    assert want_cuda(fake_torch("12.4", 1), {}, home)[0] is True
    assert want_cuda(fake_torch("12.4", 1), {"KEXUE_NO_CUDA": "1"}, home) == (False, "KEXUE_NO_CUDA=1")
    assert want_cuda(fake_torch(None, 1), {}, home) == (False, "the installed torch has no CUDA")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert want_cuda(fake_torch("12.4", 1), {}, None) == (False, "nvcc not found")
