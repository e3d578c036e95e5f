"""``EntropyNormalize``: the module form of :func:`kexue.ops.entropy_normalize`."""

from __future__ import annotations

from torch import Tensor, nn

from kexue.ops.entropy_norm import entropy_normalize


class EntropyNormalize(nn.Module):
    """Rescale distributions along ``dim`` to a fixed entropy ``target`` (nats).

    Shape: input ``(*, n, *)``, output the same. See :func:`kexue.ops.entropy_normalize`.

    Args:
        target: entropy in ``[0, log n]``; a per-call ``target`` passed to :meth:`forward` overrides it.
        dim, logits, max_iter: as in :func:`kexue.ops.entropy_normalize`.
    """

    def __init__(self, target: float, dim: int = -1, logits: bool = False, max_iter: int = 20):
        super().__init__()
        self.target = float(target)
        self.dim = dim
        self.logits = logits
        self.max_iter = max_iter

    def forward(self, x: Tensor, target: float | Tensor | None = None) -> Tensor:
        return entropy_normalize(
            x, self.target if target is None else target, dim=self.dim, logits=self.logits, max_iter=self.max_iter
        )

    def extra_repr(self) -> str:
        return f"target={self.target}, dim={self.dim}, logits={self.logits}, max_iter={self.max_iter}"
