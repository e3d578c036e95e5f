"""Functional ops. Each module: input checks, the torch.library custom ops, backend dispatch."""

from kexue.ops.entropy_norm import entropy_normalize

__all__ = ["entropy_normalize"]
