"""Functional ops. Each module: input checks, the torch.library custom ops, backend dispatch."""

from kexue.ops.entropy_norm import entropy_normalize

__all__ = ["entropy_normalize"]

from kexue.ops.biohash import (  # noqa: E402
    biohash,
    biohash_activations,
    biohash_dense,
    biohash_energy,
    biohash_schedule,
    biohash_topk,
    biohash_update,
    hamming_topk,
    new_synapses,
)

__all__ += ["biohash", "biohash_activations", "biohash_dense", "biohash_energy", "biohash_schedule",
            "biohash_topk", "biohash_update", "hamming_topk", "new_synapses"]
