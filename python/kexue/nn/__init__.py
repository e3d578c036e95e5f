"""Drop-in ``torch.nn`` modules."""

from kexue.nn.entropy_norm import EntropyNormalize

__all__ = ["EntropyNormalize"]

from kexue.nn.biohash import BioHash  # noqa: E402

__all__ += ["BioHash"]
