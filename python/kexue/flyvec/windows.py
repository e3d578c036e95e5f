"""Context windows: the FlyVec training inputs.

A window is ``size`` consecutive tokens of one sentence (stride 1); the centre token
(position ``size // 2``) is the target and is shifted by ``V`` into the second half of the 2V
input, the others are context ids in ``[0, V)``. Sentences shorter than a window give none (as in
the official trainer); repeated context words count twice (no de-duplication).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def context_windows(encoded: Iterable[Sequence[int]], vocab_size: int, size: int = 11) -> torch.Tensor:
    """``(M, size)`` int32 windows of the id sentences ``encoded``, centre shifted by ``vocab_size``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"window size must be a positive int, got {size!r}")
    chunks = []
    for ids in encoded:
        if len(ids) < size:
            continue
        t = torch.as_tensor(ids, dtype=torch.int32)
        chunks.append(t.unfold(0, size, 1))
    if not chunks:
        return torch.zeros(0, size, dtype=torch.int32)
    out = torch.cat(chunks).contiguous()
    out[:, size // 2] += vocab_size
    return out


def target_ids(windows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The target word id of each window."""
    return windows[:, windows.shape[1] // 2].long() - vocab_size
