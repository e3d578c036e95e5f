"""Entropy normalization in Triton: launchers, block sizes and the configurations they can pick.

Each row z of ``x (R, n)`` (logits, or ``log x`` for probabilities) becomes
``y = softmax(gamma * z)`` with ``gamma >= 0`` solved so that the entropy of y equals the row's
target. The arithmetic follows csrc/include/kexue/entropy_norm.h and the float64 oracle
python/kexue/reference/entropy_norm.py: the same row classification (Newton / uniform / argmax /
invalid), the same solution gamma, and the same stats ``(m, log sum exp(gamma * (z - m)))`` that let
the backward rebuild y in full precision. The kernels live by job:

* entropy_norm_rows.py: the row arithmetic every kernel shares;
* entropy_norm_tile.py: forward of rows that fit one BLOCK_M x BLOCK_N tile (x read once, Newton
  on registers, exactly the reference's iteration);
* entropy_norm_stream.py with entropy_norm_solve.py: forward of longer rows, one row a program,
  in three passes over x (scan with sampled moments, one sweep of sampled moments, write);
* entropy_norm_backward.py: backward, in registers or in three passes.

All math runs in float32 whatever the storage dtype. Block sizes come from :func:`forward_tile`
and :func:`backward_tile` (a heuristic on n, not autotuned); ``AOT_CONFIGS`` lists every
configuration the launchers can pick so that tests/gpu_compile.py can compile each one ahead of time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .entropy_norm_backward import entropy_norm_bwd_kernel
from .entropy_norm_stream import entropy_norm_fwd_stream_kernel
from .entropy_norm_tile import entropy_norm_fwd_tile_kernel


class Tile(NamedTuple):
    """A launch configuration: rows per program, columns per tile, layout, warps."""

    block_m: int
    block_n: int
    single_tile: bool
    num_warps: int


# Rows up to these lengths live in registers; longer rows are streamed in chunks. The forward
# keeps u (16 fp32 values a thread at 16 warps at n = 8192) while the Newton loop reuses it many
# times; the backward holds u, y and G at once, which at n = 8192 exceeds the 128 registers a
# thread of a 512-thread program may use (it spilled on sm_90), so it switches to chunks earlier.
MAX_SINGLE_TILE_FORWARD = 8192
MAX_SINGLE_TILE_BACKWARD = 4096
# The streamed forward evaluates 8 values of gamma per element: a (8, 512) tile over 8 warps is
# 16 fp32 lanes a thread for each of e, e*u, e*u^2. The backward streams 8 lanes a thread.
_STREAM = Tile(block_m=1, block_n=512, single_tile=False, num_warps=8)
_CHUNK = Tile(block_m=1, block_n=2048, single_tile=False, num_warps=8)
_MIN_BLOCK_N = 16
# Short rows are packed several to a program so that a tile holds this many elements.
_TILE_ELEMENTS = 512


def _tile(n: int, max_single: int, streamed: Tile) -> Tile:
    if n > max_single:
        return streamed
    block_n = max(_MIN_BLOCK_N, triton.next_power_of_2(n))
    block_m = max(1, _TILE_ELEMENTS // block_n)
    if block_m > 1:
        # Each thread holds one column of several rows, and with it the per-row Newton state
        # (gamma, bracket, target, flags) of each of those rows. 8 warps on 512 elements keep that
        # to 2 rows a thread (about 60 registers); 4 rows a thread went past 80 registers, where
        # ptxas traded a few bytes of stack for occupancy on sm_90.
        num_warps = 8
    else:
        num_warps = min(16, max(4, block_n // 256))  # 8 fp32 lanes a thread, 16 at n = 8192
    return Tile(block_m, block_n, True, num_warps)


def forward_tile(n: int) -> Tile:
    """The configuration :func:`forward` uses for rows of length n."""
    return _tile(n, MAX_SINGLE_TILE_FORWARD, _STREAM)


def backward_tile(n: int) -> Tile:
    """The configuration :func:`backward` uses for rows of length n."""
    return _tile(n, MAX_SINGLE_TILE_BACKWARD, _CHUNK)


def all_tiles(tile_for) -> list[Tile]:
    """Every configuration ``tile_for`` (:func:`forward_tile` or :func:`backward_tile`) can return:
    it depends on n only through next_power_of_2(n), so powers of two cover every n."""
    tiles = {tile_for(1 << k) for k in range(0, 31)}
    return sorted(tiles, key=lambda t: (not t.single_tile, t.block_n))


def forward(
    x: torch.Tensor, target: torch.Tensor, logits: bool, max_iter: int, tol: float, *, tile: Tile | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, gamma, stats)`` for rows ``x (R, n)`` and targets ``(R,)``; see the reference.

    ``tile`` overrides :func:`forward_tile` (tests use it to stream short rows); a streamed tile
    has block_m = 1. ``tol`` applies to rows in one tile; streamed rows solve to float32 precision
    and count max_iter in sweeps (entropy_norm_stream.py).
    """
    x = x.contiguous()
    target = target.to(torch.float32).contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    gamma = torch.empty(rows, dtype=torch.float32, device=x.device)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, gamma, stats
    tile = tile or forward_tile(n)
    if tile.single_tile:
        entropy_norm_fwd_tile_kernel[(triton.cdiv(rows, tile.block_m),)](
            x, target, y, gamma, stats, rows, n, int(max_iter), float(tol),
            LOGITS=bool(logits), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
        )  # fmt: skip
    else:
        if tile.block_m != 1:
            raise ValueError(f"a streamed forward tile handles one row a program, got block_m={tile.block_m}")
        entropy_norm_fwd_stream_kernel[(rows,)](
            x, target, y, gamma, stats, n, int(max_iter),
            LOGITS=bool(logits), BLOCK_N=tile.block_n, num_warps=tile.num_warps,
        )  # fmt: skip
    return y, gamma, stats


def backward(
    grad_y: torch.Tensor,
    grad_gamma: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor,
    stats: torch.Tensor,
    logits: bool,
    *,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_target)``: grad_x in x.dtype, grad_target (R,) float32."""
    x = x.contiguous()
    grad_y = grad_y.to(x.dtype).contiguous()  # y, hence its gradient, is stored in x.dtype
    grad_gamma = grad_gamma.to(torch.float32).contiguous()
    gamma = gamma.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    rows, n = x.shape
    grad_x = torch.empty_like(x)
    grad_target = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return grad_x, grad_target
    tile = tile or backward_tile(n)
    entropy_norm_bwd_kernel[(triton.cdiv(rows, tile.block_m),)](
        grad_y, grad_gamma, x, gamma, stats, grad_x, grad_target, rows, n,
        LOGITS=bool(logits), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_TILE=tile.single_tile,
        num_warps=tile.num_warps,
    )  # fmt: skip
    return grad_x, grad_target


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for ahead-of-time compilation (tests/gpu_compile.py).

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _tag(dtype, logits, tile):
    layout = "" if tile.single_tile else " streamed"
    kind = "logits" if logits else "probs"
    return f"{str(dtype).removeprefix('torch.')} {kind} {tile.block_m}x{tile.block_n}{layout} w{tile.num_warps}"


def _forward_config(dtype, ptr, logits, tile) -> dict:
    rows = dict(x_ptr=ptr, target_ptr="*fp32", y_ptr=ptr, gamma_ptr="*fp32", stats_ptr="*fp32")
    if tile.single_tile:
        consts = dict(LOGITS=logits, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
        kernel = entropy_norm_fwd_tile_kernel
        scalars = dict(n_rows="i32", n_cols="i32", max_iter="i32", tol="fp32")
    else:
        consts = dict(LOGITS=logits, BLOCK_N=tile.block_n)
        kernel = entropy_norm_fwd_stream_kernel
        scalars = dict(n_cols="i32", max_iter="i32")
    return dict(
        name=f"entropy_norm_fwd {_tag(dtype, logits, tile)}",
        kernel=kernel,
        signature=dict(**rows, **scalars, **dict.fromkeys(consts, "constexpr")),
        constexprs=consts,
        num_warps=tile.num_warps,
    )


def _backward_config(dtype, ptr, logits, tile) -> dict:
    consts = dict(LOGITS=logits, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_TILE=tile.single_tile)
    return dict(
        name=f"entropy_norm_bwd {_tag(dtype, logits, tile)}",
        kernel=entropy_norm_bwd_kernel,
        signature=dict(
            grad_y_ptr=ptr,
            grad_gamma_ptr="*fp32",
            x_ptr=ptr,
            gamma_ptr="*fp32",
            stats_ptr="*fp32",
            grad_x_ptr=ptr,
            grad_target_ptr="*fp32",
            n_rows="i32",
            n_cols="i32",
            **dict.fromkeys(consts, "constexpr"),
        ),
        constexprs=consts,
        num_warps=tile.num_warps,
    )


def _aot_configs() -> list[dict]:
    configs = []
    for dtype, ptr in _PTR.items():
        for logits in (True, False):
            configs += [_forward_config(dtype, ptr, logits, t) for t in all_tiles(forward_tile)]
            configs += [_backward_config(dtype, ptr, logits, t) for t in all_tiles(backward_tile)]
    return configs


AOT_CONFIGS = _aot_configs()
