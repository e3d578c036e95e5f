"""Plain PyTorch implementations written for clarity.

They are the oracle of every test (run them in float64) and the ``torch`` backend, the fallback
where nothing faster is available. Each function mirrors one kernel family, step for step.
"""

from kexue.reference.entropy_norm import entropy_normalize_backward, entropy_normalize_forward

__all__ = ["entropy_normalize_forward", "entropy_normalize_backward"]

# GlobalPointer
from kexue.reference import global_pointer  # noqa: E402

__all__ += ["global_pointer"]
from kexue.reference.logn_attention import logn_attention_backward, logn_attention_forward  # noqa: E402

__all__ += ["logn_attention_forward", "logn_attention_backward"]
from kexue.reference import biohash  # noqa: E402  (the BioHash / FlyVec oracle, as a module)

__all__ += ["biohash"]
