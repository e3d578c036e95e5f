"""ChildTuning-D: a fixed mask of the most important weights, from Fisher information.

Xu et al., EMNLP 2021 (kexue.fm/archives/8764). Before
fine-tuning, run the task's loss over some batches; after each ``loss.backward()`` call
:meth:`FisherInformation.accumulate`. The estimate is F_i = mean over batches of g_i^2, with each
tensor's gradient first clipped to ``max_grad_norm`` (the official code clips per tensor, and uses
batch-mean gradients, not per-example ones). :meth:`FisherInformation.masks` keeps the top
``reserve_p`` fraction; hand the masks to ``optimizer.set_child_tuning_masks`` of a Lion/Tiger
whose groups say ``child_tuning="D"``::

    fisher = FisherInformation(p for n, p in model.named_parameters() if "layer" in n)
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        fisher.accumulate()
    opt = kexue.optim.Lion(model.parameters(), child_tuning="D")
    opt.set_child_tuning_masks(fisher.masks(reserve_p=0.3))

The official code selects only encoder layers ("layer" in the name) and thresholds globally over
all selected tensors (``scope="global"``); the default here keeps the fraction in every tensor
(``scope="tensor"``), so that no tensor is frozen whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class FisherInformation:
    """Running sum of squared (per-tensor clipped) gradients of some parameters."""

    def __init__(self, params: Iterable[Tensor], max_grad_norm: float | None = 1.0):
        self.params = [p for p in params if p.requires_grad]
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.batches = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current gradients (call after each backward; the grads are not modified)."""
        for p, total in zip(self.params, self.sums, strict=True):
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            if self.max_grad_norm is not None:
                # clip_grad_norm_ on this tensor alone, as the official ChildTuningD.py does
                g = g * (self.max_grad_norm / (torch.linalg.vector_norm(g) + 1e-6)).clamp(max=1.0)
            total.add_(g * g)
        self.batches += 1

    def scores(self) -> list[Tensor]:
        """The Fisher estimate of each parameter (mean of the squared gradients)."""
        if self.batches == 0:
            raise RuntimeError("FisherInformation.accumulate() was never called")
        return [s / self.batches for s in self.sums]

    def masks(self, reserve_p: float = 0.3, scope: str = "tensor") -> dict[Tensor, Tensor]:
        """``{param: bool mask}`` keeping the ``reserve_p`` fraction with the largest Fisher scores.

        ``scope="tensor"``: round(reserve_p * numel) elements (at least one) in every tensor;
        ``"global"``: the same fraction over all tensors together. Ties at the threshold are kept.
        """
        if not 0.0 < reserve_p <= 1.0:
            raise ValueError(f"reserve_p must lie in (0, 1], got {reserve_p!r}")
        if scope not in ("tensor", "global"):
            raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
        scores = self.scores()
        if scope == "global":
            threshold = _top_threshold(torch.cat([s.reshape(-1) for s in scores]), reserve_p)
            return {p: s >= threshold for p, s in zip(self.params, scores, strict=True)}
        return {p: s >= _top_threshold(s.reshape(-1), reserve_p) for p, s in zip(self.params, scores, strict=True)}


def _top_threshold(values: Tensor, fraction: float) -> Tensor:
    """The smallest of the round(fraction * n) largest values (at least one is kept)."""
    n = values.numel()
    if n == 0:
        return values.new_tensor(float("inf"))
    keep = min(n, max(1, round(fraction * n)))
    return torch.kthvalue(values.cpu(), n - keep + 1).values.to(values.device)
