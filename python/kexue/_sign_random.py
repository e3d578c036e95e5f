"""Counter-based random bits of the sign optimizers, as every backend draws them.

ChildTuning-F masks and the stochastic rounding of bfloat16 params take 32 random bits per
element from a hash of two 32-bit keys and the element index; the keys come from SplitMix64 over
(seed, parameter index, step, stream). Here: the keys on the host (exact integer arithmetic), the
same keys by torch ops from a step counter held in a device tensor (capturable mode), and the
per-element bits by torch ops (the torch backend and the oracle). The C++ and Triton kernels
compute the per-element hash themselves (csrc/include/kexue/sign_optim.h, element_bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue._sign_table import keep_threshold

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al.): a well-mixed 64-bit function of a 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_prefix(seed: int, param_index: int) -> int:
    """The part of :func:`stream_keys` that does not depend on the step (64 bits)."""
    return splitmix64(splitmix64(seed & _M64) ^ (param_index & _M64))


def stream_keys(seed: int, param_index: int, step: int, stream: int) -> tuple[int, int]:
    """The two 32-bit keys of one parameter's random bits at one step, for one stream."""
    x = stream_prefix(seed, param_index)
    for word in (step, stream):
        x = splitmix64(x ^ (word & _M64))
    return x & _M32, x >> 32


# The same keys computed by torch ops on the device from a step counter held in a tensor
# (capturable mode: the host never reads the step). A 64-bit word is a pair (hi, lo) of int64
# tensors holding uint32 values, so that no intermediate overflows int64.


def _add64(x: tuple[Tensor, Tensor], c: int) -> tuple[Tensor, Tensor]:
    hi, lo = x
    lo = lo + (c & _M32)
    return (hi + (c >> 32) + (lo >> 32)) & _M32, lo & _M32


def _xor_shift64(x: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
    """``x ^ (x >> n)`` for 0 < n < 32."""
    hi, lo = x
    return hi ^ (hi >> n), lo ^ (((lo >> n) | (hi << (32 - n))) & _M32)


def _mul64(x: tuple[Tensor, Tensor], c: int) -> tuple[Tensor, Tensor]:
    """``x * c mod 2^64``: the low word's full 64-bit product from 16-bit halves of c, the cross
    terms mod 2^32 (:func:`_mul32`)."""
    hi, lo = x
    c_lo, c_hi = c & _M32, c >> 32
    p0, p1 = lo * (c_lo & 0xFFFF), lo * (c_lo >> 16)  # each < 2^48
    low = p0 + ((p1 & 0xFFFF) << 16)
    high = (p1 >> 16) + (low >> 32) + _mul32(lo, c_hi) + _mul32(hi, c_lo)
    return high & _M32, low & _M32


def _splitmix64_words(x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`splitmix64` on (hi, lo) words."""
    x = _add64(x, 0x9E3779B97F4A7C15)
    x = _mul64(_xor_shift64(x, 30), 0xBF58476D1CE4E5B9)
    x = _mul64(_xor_shift64(x, 27), 0x94D049BB133111EB)
    return _xor_shift64(x, 31)


def stream_keys_from_step(prefix: Tensor, step: Tensor, stream: int) -> tuple[Tensor, Tensor]:
    """:func:`stream_keys` for a batch of parameters with torch ops on the step tensors' device.

    ``prefix``: int64 (N, 2) tensor of the (hi, lo) words of :func:`stream_prefix`; ``step``: (N,)
    step counters (float or int, whole numbers below 2^32). Returns the two int64 key tensors (N,).
    """
    t = step.to(torch.int64) & _M32
    x = _splitmix64_words((prefix[:, 0], prefix[:, 1] ^ t))
    hi, lo = _splitmix64_words((x[0], x[1] ^ (stream & _M32)))
    return lo, hi


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for int64 tensors holding uint32 values, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: Tensor) -> Tensor:
    """The "lowbias32" hash of sign_optim.h on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def element_bits(keys: tuple[int, int], numel: int, device=None) -> Tensor:
    """32 random bits for each element index 0..numel-1 (int64 tensor), as the kernels draw them."""
    k0, k1 = keys
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return _mix32(_mix32((index & _M32) ^ k0) ^ (index >> 32) ^ k1)


def child_tuning_f_gate(keys: tuple[int, int], p: float, numel: int, device=None) -> Tensor:
    """ChildTuning-F's Bernoulli(p) keep mask (bool, flat) for one parameter at one step."""
    return (element_bits(keys, numel, device) >> 8) < keep_threshold(p)


def to_bf16_stochastic(x: Tensor, keys: tuple[int, int]) -> Tensor:
    """Stochastic rounding of float32 ``x`` to bfloat16 with the kernels' random bits."""
    x = x.float().contiguous()
    bits = x.view(torch.int32).to(torch.int64) & _M32
    noise = element_bits(keys, x.numel(), x.device).view(x.shape) & 0xFFFF
    top = ((bits + noise) >> 16) & 0xFFFF
    top = torch.where(top >= 1 << 15, top - (1 << 16), top)  # as int16 two's complement
    rounded = top.to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))
