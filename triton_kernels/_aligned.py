"""The one host-side layout rule the Triton launchers share: hand kernels aligned, contiguous tensors.

The JIT specializes pointers that are 16-byte aligned, and only that form of each kernel was sized
to its registers and checked (``aligned_only`` AOT entries, tests/gpu_compile.py): an unaligned
view, e.g. a slice of a fused projection, would compile a scalar-load variant that may spill.
"""

from __future__ import annotations

import torch


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned: ``t`` itself when it already is, else a copy."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
