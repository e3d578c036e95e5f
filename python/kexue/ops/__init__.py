"""Functional ops. Each module: input checks, the torch.library custom ops, backend dispatch."""

from kexue.ops.entropy_norm import entropy_normalize

__all__ = ["entropy_normalize"]

from kexue.ops.logn_attention import logn_attention  # noqa: E402

__all__ += ["logn_attention"]
