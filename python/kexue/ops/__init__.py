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
