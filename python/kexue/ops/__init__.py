"""Functional ops. Each module: input checks, the torch.library custom ops, backend dispatch."""

from kexue.ops.entropy_norm import entropy_normalize

__all__ = ["entropy_normalize"]

# GlobalPointer
from kexue.ops.global_pointer import (  # noqa: E402
    global_pointer_decode,
    global_pointer_loss,
    global_pointer_scores,
    multilabel_crossentropy,
)

__all__ += ["global_pointer_decode", "global_pointer_loss", "global_pointer_scores", "multilabel_crossentropy"]
from kexue.ops.logn_attention import logn_attention  # noqa: E402

__all__ += ["logn_attention"]
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

__all__ += [
    "biohash",
    "biohash_activations",
    "biohash_dense",
    "biohash_energy",
    "biohash_schedule",
    "biohash_topk",
    "biohash_update",
    "hamming_topk",
    "new_synapses",
]
