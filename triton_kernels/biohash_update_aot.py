"""Every configuration the BioHash learning-step launcher (:mod:`.biohash_update`) can pick, as
``AOT_CONFIGS`` for tests/gpu_compile.py's ahead-of-time check."""

from __future__ import annotations

from .biohash import num_warps_for, stages_for
from .biohash_update import (
    GROUP_BLOCK,
    MAX_DS_BLOCK,
    UPDATE_BLOCK_B,
    UPDATE_BLOCK_U,
    _group_sums_kernel,
    _update_ds_kernel,
    _update_nx_kernel,
    _update_rows_kernel,
    _update_xx_kernel,
    ds_chunk,
    rows_tokens,
)


def _aot_configs() -> list[dict]:
    configs = []
    blocks = [64 << i for i in range(7)]  # 64 .. 4096 = block_k(MAX_HIDDEN)
    for anti in (False, True):
        for block in blocks:
            configs.append(
                dict(
                    name=f"update_rows {'anti ' if anti else ''}K<={block} w{num_warps_for(block)}",
                    kernel=_update_rows_kernel,
                    signature=dict(
                        ids_ptr="*i64",
                        offsets_ptr="*i64",
                        weights_ptr="*fp32",
                        wt_ptr="*fp32",
                        winners_ptr="*i64",
                        s_win_ptr="*fp32",
                        second_ptr="*i64",
                        s_second_ptr="*fp32",
                        unit_ptr="*i32",
                        value_ptr="*fp32",
                        K="i32",
                        nnz="i32",
                        rank="i32",
                        delta="fp32",
                        ANTI="constexpr",
                        BLOCK_K="constexpr",
                        TOKENS="constexpr",
                        STAGES="constexpr",
                        EXACT="constexpr",
                    ),
                    constexprs=dict(
                        ANTI=anti,
                        BLOCK_K=block,
                        TOKENS=rows_tokens(block),
                        STAGES=stages_for(block, rows_tokens(block)),
                        EXACT=True,
                    ),
                    num_warps=num_warps_for(block),
                    expect=["vector_loads"] if block >= 128 else [],  # 64 lanes: 2 a thread
                )
            )
        configs.append(
            dict(
                name=f"update_xx {'anti ' if anti else ''}{UPDATE_BLOCK_B}x{UPDATE_BLOCK_U}",
                kernel=_update_xx_kernel,
                signature=dict(
                    winners_ptr="*i64",
                    s_win_ptr="*fp32",
                    second_ptr="*i64",
                    s_second_ptr="*fp32",
                    partial_ptr="*fp32",
                    rows="i32",
                    K="i32",
                    delta="fp32",
                    rows_per_split="i32",
                    ANTI="constexpr",
                    BLOCK_B="constexpr",
                    BLOCK_U="constexpr",
                    EXACT="constexpr",
                ),
                constexprs=dict(ANTI=anti, BLOCK_B=UPDATE_BLOCK_B, BLOCK_U=UPDATE_BLOCK_U, EXACT=True),
                num_warps=4,
            )
        )
    configs.append(
        dict(
            name=f"update_nx {UPDATE_BLOCK_U}",
            kernel=_update_nx_kernel,
            signature=dict(partial_ptr="*fp32", nx_ptr="*fp32", splits="i32", K="i32", BLOCK_U="constexpr"),
            constexprs=dict(BLOCK_U=UPDATE_BLOCK_U),
            num_warps=1,
        )
    )
    configs.append(
        dict(
            name=f"update_group_sums {GROUP_BLOCK}",
            kernel=_group_sums_kernel,
            signature=dict(values_ptr="*fp32", starts_ptr="*i64", sums_ptr="*fp32", groups="i32", BLOCK_G="constexpr"),
            constexprs=dict(BLOCK_G=GROUP_BLOCK),
            num_warps=1,
        )
    )
    for apply in (False, True):
        for block in [b for b in blocks if b <= MAX_DS_BLOCK]:
            configs.append(
                dict(
                    name=f"update_ds {'apply' if apply else 'max'} K<={block} w{num_warps_for(block)}",
                    kernel=_update_ds_kernel,
                    signature=dict(
                        wt_ptr="*fp32",
                        nx_ptr="*fp32",
                        bounds_ptr="*i64",
                        group_unit_ptr="*i32",
                        group_sum_ptr="*fp32",
                        partial_ptr="*fp32",
                        nc_ptr="*fp32",
                        lr="fp32",
                        prec="fp32",
                        tiny="fp32",
                        K="i32",
                        APPLY="constexpr",
                        BLOCK_K="constexpr",
                        CHUNK="constexpr",
                        EXACT="constexpr",
                    ),
                    constexprs=dict(APPLY=apply, BLOCK_K=block, CHUNK=ds_chunk(block), EXACT=True),
                    num_warps=num_warps_for(block),
                    expect=["vector_loads"] if block >= 128 else [],  # 64 lanes: 2 a thread
                )
            )
    return configs


AOT_CONFIGS = _aot_configs()
