"""kexue: fused kernels with fast CPU fallbacks for PyTorch.

``kexue.ops`` holds the functional ops, ``kexue.nn`` the modules, ``kexue.optim`` the optimizers,
``kexue.reference`` the plain-PyTorch oracle. ``kexue.backends()`` reports which backends are
available here; ``kexue.use_backend(name)`` or ``KEXUE_BACKEND=name`` forces one.
"""

from kexue._backend import BackendUnavailableError, backends, use_backend
from kexue import nn, ops, optim, reference  # noqa: E402  (after the backend probe)
from kexue import init  # noqa: E402  (BERT-style initialization: kexue.init.bert_, trunc_normal_tf_)

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "backends", "use_backend", "nn", "ops", "optim", "reference", "__version__"]
__all__ += ["init"]
