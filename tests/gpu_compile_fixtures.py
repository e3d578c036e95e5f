"""Kernels built to fail tests/gpu_compile.py's checks, so that the check itself is tested.

Not shipped and never launched: tests/test_gpu_compile.py compiles these AOT_CONFIGS ahead of time
and asserts that each one is reported with the problem it was built to have, and that the healthy
one passes every check.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fixture_dot_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ B over K in steps of BLOCK_K, one tile per program; A (BLOCK_M, K), B (K, BLOCK_N)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc)


@triton.jit
def _fixture_chained_dot_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """O = sum over key blocks of (Q K^T) V: chained dots in a loop, as in attention (Triton then
    lays every warp along M, so a tile with fewer than 16 rows a warp is computed more than once)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + rm[:, None] * BLOCK_D + rd[None, :])
    o = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        k = tl.load(k_ptr + (n0 + rn)[:, None] * BLOCK_D + rd[None, :])
        v = tl.load(v_ptr + (n0 + rn)[:, None] * BLOCK_D + rd[None, :])
        s = tl.dot(q, tl.trans(k))
        o += tl.dot(s.to(v.dtype), v)
    tl.store(o_ptr + rm[:, None] * BLOCK_D + rd[None, :], o)


def _dot(name: str, m: int, n: int, k: int, warps: int, **extra) -> dict:
    return dict(
        name=name,
        kernel=_fixture_dot_kernel,
        num_warps=warps,
        signature=dict(
            a_ptr="*bf16",
            b_ptr="*bf16",
            c_ptr="*fp32",
            K="i32",
            BLOCK_M="constexpr",
            BLOCK_N="constexpr",
            BLOCK_K="constexpr",
        ),
        constexprs=dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k),
        **extra,
    )


def _chained(name: str, m: int, n: int, d: int, warps: int, **extra) -> dict:
    return dict(
        name=name,
        kernel=_fixture_chained_dot_kernel,
        num_warps=warps,
        signature=dict(
            q_ptr="*bf16",
            k_ptr="*bf16",
            v_ptr="*bf16",
            o_ptr="*fp32",
            N="i32",
            BLOCK_M="constexpr",
            BLOCK_N="constexpr",
            BLOCK_D="constexpr",
        ),
        constexprs=dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=d),
        **extra,
    )


AOT_CONFIGS = [
    # A 128x128 fp32 accumulator on one warp: 512 registers a thread, twice the most there are.
    _dot("fixture spills", 128, 128, 16, 1, archs=(80,)),
    # Four pipelined stages of 128x256 and 256x128 bf16 operand tiles: 128 KB a stage.
    _dot("fixture shared overflow", 128, 128, 256, 8, num_stages=4, archs=(86,)),
    # 64 query rows on 8 warps along M (chained dots): two warps hold each 16-row slice.
    _chained("fixture replicated", 64, 64, 64, 8, archs=(80, 90), expect=("no_replication",)),
    # One warp cannot issue wgmma (a warpgroup of four can): sm_90 falls back to mma.sync.
    _chained("fixture no wgmma", 16, 64, 64, 1, archs=(90,), expect=("wgmma",)),
    # Its launcher would align every pointer: only the jit form is compiled, never the plain one.
    _dot("fixture aligned only", 64, 64, 64, 4, archs=(80,), aligned_only=True),
    # Well shaped: must pass every check, wgmma on sm_90 and 16-byte copies from global memory.
    _dot(
        "fixture healthy",
        64,
        64,
        64,
        4,
        archs=(80, 90),
        expect=("tensor_cores", "vector_loads", "no_replication", "wgmma"),
    ),
]
