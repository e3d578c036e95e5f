"""The log-n attention kernels' AOT lists (what tests/gpu_compile.py compiles) against what the
launchers can pick and how Triton's JIT will compile it: every pickable tile is listed with its
warps and stages, nothing is listed that a GPU never runs, every configuration with dots demands
unreplicated tiles, and every integer the lists compile as a runtime value is one the kernel keeps
at runtime. No kernel runs here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kexue.triton_kernels import logn_attention as K  # noqa: E402  (after the skip)
from kexue.triton_kernels import (  # noqa: E402
    logn_attention_bwd_dkdv,
    logn_attention_bwd_dq,
    logn_attention_bwd_prep,
    logn_attention_bwd_tiles,
    logn_attention_decode,
    logn_attention_decode_aot,
    logn_attention_fwd,
    logn_attention_fwd_aot,
)
from kexue.triton_kernels.logn_attention_rules import RUNTIME_INTS  # noqa: E402

from tests.jit_specialization import assert_compiled_as_kept, runtime_ints  # noqa: E402

AOT_MODULES = (
    logn_attention_fwd_aot,
    logn_attention_bwd_dkdv,
    logn_attention_bwd_dq,
    logn_attention_bwd_prep,
    logn_attention_decode_aot,
)


def test_aot_configs_cover_every_pickable_config():
    """Every tile configuration the launchers can pick is in an AOT_CONFIGS list (so the static
    GPU check sees it): each family x head-dim class x dtype, for every kernel."""
    from kexue.triton_kernels.logn_attention_rules import block_d, dot_mode, max_head_dim, value_block

    def listed(module, kernel, constexprs, warps_stages=None):
        return any(
            c["kernel"] is kernel
            and all(c["constexprs"].get(k) == v for k, v in constexprs.items())
            and (warps_stages is None or (c["num_warps"], c["num_stages"]) == warps_stages)
            for c in module.AOT_CONFIGS
        )

    for family in (80, 86, 90):
        for dtype, tf32 in ((torch.float16, 0), (torch.bfloat16, 0), (torch.float32, 0), (torch.float32, 1)):
            mode = {torch.float32: 3 if tf32 else 1}.get(dtype, 0)  # the GPU's modes, not the interpreter's
            heads = (8, 24, 40, 64, 72, 80, 96, 128, 256)
            for head_dim in (h for h in heads if h <= max_head_dim(mode)):  # wider: not Triton
                d = K.row_length(head_dim)  # what the launchers pass
                bd = block_d(d)
                for has_mask in (False, True):
                    default, *alternates = logn_attention_fwd.candidates(family, d, mode, has_mask)
                    # the default's dense causal form is covered by its masked one (same tile); an
                    # alternate without a mask is listed in both forms itself, with one in the causal
                    alt_causals = (True,) if has_mask else (False, True)
                    for t, causals in ((default, (None,)), *((a, alt_causals) for a in alternates)):
                        for causal in causals:
                            want = dict(
                                BLOCK_M=t.block_m,
                                BLOCK_N=t.block_n,
                                BLOCK_D=bd,
                                BLOCK_DV=value_block(d),
                                IEEE=mode,
                                HAS_MASK=has_mask,
                                EVEN_D=d == bd,
                                **({} if causal is None else {"CAUSAL": causal}),
                            )
                            ws = (t.num_warps, t.num_stages)
                            assert listed(logn_attention_fwd_aot, logn_attention_fwd.logn_fwd_kernel, want, ws), (
                                family,
                                dtype,
                                d,
                                t,
                            )
                # the backward: each kernel's default and alternates (which do not depend on the
                # switches), each with and without a mask and packed
                for module, name in ((logn_attention_bwd_dkdv, "dkdv"), (logn_attention_bwd_dq, "dq")):
                    kernel = getattr(module, f"logn_bwd_{name}_kernel")
                    for t in logn_attention_bwd_tiles.candidates(name, family, d, mode):
                        for has_mask, varlen in ((False, False), (True, False), (False, True)):
                            want = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=bd, IEEE=mode, EVEN_D=d == bd)
                            want.update(BLOCK_DV=logn_attention_bwd_tiles.value_width(name, family, d))
                            want.update(HAS_MASK=has_mask, VARLEN=varlen)
                            assert listed(module, kernel, want, (t.num_warps, t.num_stages)), (name, family, d, t)
    assert dot_mode(torch.float32) == 1 and dot_mode(torch.float16) == 0
    assert dot_mode(torch.float32, allow_tf32=True) in (3, 4) and dot_mode(torch.float16, allow_tf32=True) == 0
    # d=256 for 16-bit inputs only (no TF32 tiles fitted); sm_86 dK/dV in 64-column slices
    assert max_head_dim(0) == 256
    assert [logn_attention_bwd_tiles.value_width("dkdv", f, 256) for f in (80, 86, 90)] == [128, 64, 128]
    assert [logn_attention_bwd_tiles.value_width("dq", f, 256) for f in (80, 86, 90)] == [128, 128, 128]
    assert {max_head_dim(m) for m in (1, 3)} == {128}


def test_aot_lists_stop_where_the_dispatcher_stops():
    """Every configuration compiled for a GPU target is one the dispatcher can launch there: padded
    head sizes up to max_head_dim, never float32 without TF32; and the preprocess lists
    each padded head size of every dtype (it runs before the dK/dV and dQ kernels in every backward)."""
    from kexue.triton_kernels.logn_attention_rules import FP32_IEEE, block_d, max_head_dim

    for module in AOT_MODULES:
        for c in module.AOT_CONFIGS:
            # the kernels without dots (preprocess, decode merge) have no IEEE switch: float32 counts as TF32
            mode = c["constexprs"].get("IEEE", 3 if c["signature"].get("out_ptr") == "*fp32" else 0)
            if c.get("archs", (80,)) == ():
                assert mode == FP32_IEEE, c["name"]
                continue
            assert c["constexprs"]["BLOCK_D"] <= block_d(max_head_dim(mode)), c["name"]
            assert mode != FP32_IEEE, c["name"]
    # the decode kernel: every padded width, EVEN_D, warp and stage count the launcher can pick on
    # each target family, compiled for that family's targets
    dec = logn_attention_decode
    for family, arch in ((80, 80), (86, 89), (90, 90)):
        for dtype, mode in ((torch.float16, 0), (torch.bfloat16, 0), (torch.float32, 3)):
            for head in (h for h in (8, 40, 64, 72, 96, 128, 256) if h <= max_head_dim(mode)):
                bd = dec._block_d(K.row_length(head))
                for rows in sorted({dec._block_rows(n, bd) for n in range(1, 17 * 64)}):
                    want = dict(BLOCK_D=bd, EVEN_D=K.row_length(head) == bd, BLOCK_R=rows, IEEE=mode)
                    warps = dec._num_warps(rows, bd, dtype.itemsize, family)
                    stages = dec._num_stages(bd, dtype.itemsize, family, rows)
                    assert any(
                        (c["num_warps"], c.get("num_stages")) == (warps, stages)
                        and arch in c.get("archs", (arch,))
                        and all(c["constexprs"].get(k) == v for k, v in want.items())
                        for c in logn_attention_decode_aot.AOT_CONFIGS
                    ), (family, dtype, head, rows)
                    # and the merge of the splits at that height and width
                    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16"}.get(dtype, "*fp32")
                    assert any(
                        c["kernel"] is dec.logn_decode_combine_kernel
                        and c["signature"]["out_ptr"] == ptr
                        and (c["constexprs"]["BLOCK_R"], c["constexprs"]["BLOCK_D"]) == (rows, bd)
                        for c in logn_attention_decode_aot.AOT_CONFIGS
                    ), (dtype, head, rows)
    prep = {(c["signature"]["out_ptr"], c["constexprs"]["BLOCK_D"]) for c in logn_attention_bwd_prep.AOT_CONFIGS}
    assert prep == {(p, d) for p in ("*fp16", "*bf16", "*fp32") for d in (16, 32, 64, 128)} | {
        ("*fp16", 256),
        ("*bf16", 256),
    }


def test_every_gpu_dot_config_demands_unreplicated_tiles():
    # tests/gpu_compile.py fails a dot replicated across warps only where a configuration demands
    # so: every log-n configuration with dots that a GPU runs does, none exempt (the preprocess
    # and the decode merge have no dots)
    no_dots = (logn_attention_decode.logn_decode_combine_kernel, logn_attention_bwd_prep.logn_bwd_prep_kernel)
    for module in AOT_MODULES:
        for c in module.AOT_CONFIGS:
            if c.get("archs", (80,)) != () and c["kernel"] not in no_dots:
                assert "no_replication" in c["expect"], c["name"]


def test_decode_tile_heights_are_the_compiled_ones():
    # the launcher only picks the two tile heights the AOT list compiles, whatever the row count;
    # heads of 256 only the 16-row one
    assert {logn_attention_decode._block_rows(n) for n in range(1, 1025)} == {16, 64}
    assert logn_attention_decode._block_rows(16) == 16 and logn_attention_decode._block_rows(17) == 64
    assert {logn_attention_decode._block_rows(n, 256) for n in range(1, 1025)} == {16}


def test_kernels_never_fold_a_one_the_static_check_did_not():
    # the ints the AOT lists compile as runtime values that are often 1 (head counts; for the
    # decode kernels also lengths and splits) are kept at runtime by the kernels (the Lq = 1 decode
    # and Hkv = 1 forward forms kept stacks)
    kept = runtime_ints(
        {
            f"kexue.triton_kernels.{module}": kernels
            for module, kernels in (
                ("logn_attention_fwd", ["logn_fwd_kernel"]),
                ("logn_attention_bwd_dkdv", ["logn_bwd_dkdv_kernel"]),
                ("logn_attention_bwd_dq", ["logn_bwd_dq_kernel"]),
                ("logn_attention_bwd_prep", ["logn_bwd_prep_kernel"]),
                ("logn_attention_decode", ["logn_decode_split_kernel", "logn_decode_combine_kernel"]),
            )
        }
    )
    assert kept["logn_decode_split_kernel"] == {"Hq", "Hkv", "Lq", "Lk"}
    assert kept["logn_decode_combine_kernel"] == {"Hq", "Hkv", "Lq", "splits", "stride_lb", "stride_lh"}
    for module in AOT_MODULES:
        assert_compiled_as_kept(module.AOT_CONFIGS, kept, RUNTIME_INTS)


@pytest.mark.parametrize(
    "family,dtype,allow_tf32,d,served",
    [
        (90, torch.bfloat16, False, 256, True),
        (80, torch.float16, False, 256, True),
        (86, torch.bfloat16, False, 256, True),  # dK/dV in 64-column slices there
        (86, torch.bfloat16, False, 128, True),
        (90, torch.float32, True, 256, False),  # no d=256 TF32 tiles
        (90, torch.float32, True, 128, True),
        (90, torch.float32, False, 64, False),  # float32 without TF32 never
    ],
)
def test_the_dispatcher_takes_heads_up_to_max_head_dim(monkeypatch, family, dtype, allow_tf32, d, served):
    """What the op's Triton backend takes on a GPU (a stand-in for a CUDA tensor, the family
    patched): heads up to max_head_dim for the dot mode on every family, and what it refuses it names."""
    from types import SimpleNamespace

    from kexue.ops import _logn_attention_backends as backends

    monkeypatch.setattr(K, "arch_family", lambda device: family)
    q = SimpleNamespace(is_cuda=True, device=None, dtype=dtype, shape=(1, 2, 3, d))
    reason = backends._triton_serves(q, allow_tf32)
    assert (reason is None) == served, reason
    if not served and d > 128:
        assert "heads wider than 128" in reason
