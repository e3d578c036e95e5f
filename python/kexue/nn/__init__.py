"""Drop-in ``torch.nn`` modules."""

from kexue.nn.entropy_norm import EntropyNormalize

__all__ = ["EntropyNormalize"]

# GlobalPointer
from kexue.nn.global_pointer import EfficientGlobalPointer, GlobalPointer, GPLinker  # noqa: E402

__all__ += ["EfficientGlobalPointer", "GlobalPointer", "GPLinker"]
from kexue.nn.logn_attention import LogNAttention  # noqa: E402

__all__ += ["LogNAttention"]
from kexue.nn.biohash import BioHash  # noqa: E402

__all__ += ["BioHash"]
