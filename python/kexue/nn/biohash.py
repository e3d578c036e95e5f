"""``BioHash``: a hashing layer (the module form of :func:`kexue.ops.biohash`) that can learn."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import kexue.ops


class BioHash(nn.Module):
    """Sparse inputs -> k-of-K binary codes by winner-take-all over learned synapses.

    Shape: ``forward(indices, offsets_or_mask=None, weights=None)`` takes the sparse batch
    spellings of :func:`kexue.ops.biohash` (CSR, or padded ``(B, L)`` ids with a mask) or a dense
    floating ``(B, N)`` input, and returns uint8 codes ``(B, ceil(K/8))`` (``packed``) or
    ``(B, K)`` of 0/1. The codes carry no gradient; the synapses learn by the BioHash rule
    (:meth:`learn`), not by backpropagation, so they are a buffer, not a parameter.

    Args:
        num_inputs: N. num_hidden: K. k: active units per code.
        packed: packed bits or a dense 0/1 code. std: initial synapses ~ N(0, std^2).
    """

    def __init__(
        self,
        num_inputs: int,
        num_hidden: int,
        k: int,
        packed: bool = True,
        std: float = 0.02,
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not 1 <= k <= num_hidden:
            raise ValueError(f"k must lie in [1, num_hidden] = [1, {num_hidden}], got {k}")
        self.k, self.packed = int(k), bool(packed)
        self.register_buffer(
            "synapses",
            kexue.ops.new_synapses(num_hidden, num_inputs, std=std, dtype=dtype, device=device, generator=generator),
        )

    def forward(self, indices: Tensor, offsets_or_mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        return kexue.ops.biohash(indices, offsets_or_mask, weights, self.synapses, self.k, self.packed)

    @torch.no_grad()
    def learn(
        self,
        indices: Tensor,
        offsets_or_mask: Tensor | None = None,
        weights: Tensor | None = None,
        *,
        lr: float = 0.002,
        delta: float = 0.0,
        rank: int = 2,
    ) -> Tensor:
        """One step of the learning rule (:func:`kexue.ops.biohash_update`) on a sparse batch;
        returns each row's winning unit."""
        winners, _ = kexue.ops.biohash_update(
            indices, offsets_or_mask, weights, self.synapses, lr, delta=delta, rank=rank
        )
        return winners

    def extra_repr(self) -> str:
        num_hidden, num_inputs = self.synapses.shape
        return f"num_inputs={num_inputs}, num_hidden={num_hidden}, k={self.k}, packed={self.packed}"
