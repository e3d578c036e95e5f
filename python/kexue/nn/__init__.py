"""Drop-in ``torch.nn`` modules."""

from kexue.nn.entropy_norm import EntropyNormalize

__all__ = ["EntropyNormalize"]
