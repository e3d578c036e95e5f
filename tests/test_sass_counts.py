""".ci/sass_counts.py on synthetic cuobjdump listings: the checks that .ci/check-cuda runs on the
SASS of the CUDA objects fail where they should (no GPU or CUDA build needed: a script stands in
for cuobjdump and prints the listing; c++filt demangles the names)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sass_counts", os.path.join(ROOT, ".ci", "sass_counts.py"))
sass_counts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_counts)

pytestmark = pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) not installed")

STEP = "_ZN5kexue12_GLOBAL__N_111step_kernelILi0ELi1EEEvPKNS_10sign_optim4ItemE"  # step_kernel<0, 1>
PREPASS = "_ZN5kexue12_GLOBAL__N_114prepass_kernelILi2EEEvPKNS_10sign_optim4ItemE"  # prepass_kernel<2>

# What the step's float32 arithmetic compiles to through kexue/ieee_float.h (FFMA with -RZ or 1,
# no .FTZ), its 128-bit accesses, and the compiler's integer division (F2I.FTZ ... TRUNC: exempt).
CLEAN_STEP = """\
        /*0100*/                   LDG.E.128 R4, [R2.64] ;
        /*0110*/                   F2I.FTZ.U32.TRUNC.NTZ R5, R4 ;
        /*0120*/                   FFMA R10, R6, R7, -RZ ;
        /*0130*/                   FFMA R9, R0, 1, R9 ;
        /*0140*/                   STG.E.128 [R2.64], R8 ;
"""
CLEAN_PREPASS = """\
        /*0100*/                   LDG.E.128 R4, [R2.64] ;
        /*0120*/                   FFMA R10, R4, R4, R10 ;
"""


def listing(step_body: str, prepass_body: str = CLEAN_PREPASS) -> str:
    out = []
    for arch in ("sm_80", "sm_90"):
        out.append(f"arch = {arch}\ncode version = [1,8]\n")
        out.append(f'\t\tFunction : {STEP}\n\t.headerflags\t@"EF_CUDA_SM80"\n{step_body}')
        out.append(f'\t\tFunction : {PREPASS}\n\t.headerflags\t@"EF_CUDA_SM80"\n{prepass_body}')
    return "\n".join(out)


@pytest.fixture
def fake_cuobjdump(tmp_path):
    """A cuobjdump that prints the listing written to ``<tmp>/listing.sass``; returns (write, path)."""
    text = tmp_path / "listing.sass"
    tool = tmp_path / "cuobjdump"
    tool.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(text)!r}).read())\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return text.write_text, str(tool)


def test_sign_optim_clean_listing_passes(fake_cuobjdump, capsys):
    write, tool = fake_cuobjdump
    write(listing(CLEAN_STEP))
    assert sass_counts.sign_optim("obj.o", tool) == 0
    out = capsys.readouterr().out
    assert "step_kernel<f32, bf16>" in out and "prepass_kernel<f16>" in out
    assert "no .FTZ" in out


@pytest.mark.parametrize(
    "instruction",
    [
        "FFMA.FTZ R1, R2, R3, R4 ;",
        "FADD.FTZ R1, R2, R3 ;",
        "FMUL.FTZ R1, R2, R3 ;",
        "FSETP.GT.FTZ.AND P0, PT, R1, RZ, PT ;",
    ],
)
def test_sign_optim_fails_on_a_flushing_float_instruction(fake_cuobjdump, instruction):
    write, tool = fake_cuobjdump
    write(listing(CLEAN_STEP + f"        /*0150*/                   {instruction}\n"))
    with pytest.raises(SystemExit) as e:
        sass_counts.sign_optim("obj.o", tool)
    msg = str(e.value)
    assert ".FTZ" in msg and "step_kernel<f32, bf16> (sm_80)" in msg and "step_kernel<f32, bf16> (sm_90)" in msg
    assert "prepass_kernel" not in msg


def test_sign_optim_ftz_rule_covers_the_prepass(fake_cuobjdump):
    write, tool = fake_cuobjdump
    write(listing(CLEAN_STEP, CLEAN_PREPASS + "        /*0130*/                   FFMA.FTZ R10, R4, R4, R10 ;\n"))
    with pytest.raises(SystemExit, match=r"prepass_kernel<f16> \(sm_80\)"):
        sass_counts.sign_optim("obj.o", tool)


def test_ftz_count_exempts_only_truncating_f2i():
    def count(body: str) -> int:
        return len(re.findall(sass_counts.SIGN_COUNTS["FTZ"], body))

    assert count("F2I.FTZ.U32.TRUNC.NTZ R5, R4 ;") == 0
    assert count("F2I.FTZ.U32.CEIL R5, R4 ;") == 1  # a positive subnormal would round up to 1
    assert count(CLEAN_STEP) == 0
    assert count("FMNMX.FTZ R1, R2, R3, !PT ;\nFSETP.NAN.FTZ.AND P0, PT, R1, R1, PT ;") == 2


def test_sign_optim_still_requires_128_bit_accesses(fake_cuobjdump):
    write, tool = fake_cuobjdump
    write(listing(CLEAN_STEP.replace("STG.E.128", "STG.E")))
    with pytest.raises(SystemExit, match=r"step_kernel<f32, bf16> \(sm_80\)"):
        sass_counts.sign_optim("obj.o", tool)
