"""kexue: fused kernels with fast CPU fallbacks for PyTorch.

``kexue.ops`` holds the functional ops, ``kexue.nn`` the modules, ``kexue.optim`` the optimizers,
``kexue.reference`` the plain-PyTorch oracle, ``kexue.init`` BERT-style initialization.
``kexue.patch(model, train_len=...)`` puts kexue's attention into a built Hugging Face transformers
model. ``kexue.backends()`` reports which backends are available here; ``kexue.use_backend(name)``
or ``KEXUE_BACKEND=name`` forces one.
"""

from kexue import (  # noqa: E402  (after the backend probe)
    init,  # noqa: E402  (BERT-style initialization: kexue.init.bert_, trunc_normal_tf_)
    nn,
    ops,
    optim,
    reference,
)
from kexue._backend import BackendUnavailableError, backends, use_backend
from kexue.integrations import patch, unpatch  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError",
    "backends",
    "use_backend",
    "init",
    "nn",
    "ops",
    "optim",
    "reference",
    "patch",
    "unpatch",
    "__version__",
]
