"""Drop-in ``torch.nn`` modules."""

from kexue.nn.entropy_norm import EntropyNormalize

__all__ = ["EntropyNormalize"]

from kexue.nn.logn_attention import LogNAttention  # noqa: E402

__all__ += ["LogNAttention"]
