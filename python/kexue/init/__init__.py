"""BERT-style initialization as plain in-place functions (docs/init.md, kexue.fm/archives/8747).

Three functions, each PyTorch-style (trailing underscore, in place, under ``torch.no_grad()``,
returning what it was given, ``generator=`` for reproducible draws):

- :func:`trunc_normal_tf_` (a tensor): TensorFlow's ``truncated_normal``, cut at +-2 std *relative*
  to the requested std. Its realised std is ``std * TF_TRUNCATED_STD_RATIO`` (0.0176 for 0.02);
  ``exact_std=True`` corrects the request so that the realised std is ``std``.
- :func:`bert_` (a module): BERT's initialization of every submodule: linear/conv weights and
  embeddings ~ N(0, std) (plain normal as in Hugging Face's PyTorch BERT, or ``truncated=True``
  as in the original TF BERT), biases 0, padding rows of embeddings 0, norm gains 1 and shifts 0;
  ``n_layers=`` adds the depth scaling of :func:`scale_residual_`.
- :func:`scale_residual_` (a module): divides the weights of the residual-branch output projections
  by sqrt(2 * n_layers) (GPT-2's convention), so that the sum of 2 * n_layers residual branches
  keeps the variance of one at initialization.

Why 0.02 (docs/init.md): about half of Xavier's 1/sqrt(768) for BERT-base, small enough that
each Post-Norm block is close to the identity at init (less gradient vanishing), large enough to
keep diversity. The implementer trap: ``torch.nn.init.trunc_normal_(t, std=0.02)`` cuts at the
ABSOLUTE values -2 and 2, i.e. it does not truncate at all for std 0.02.

Layout: ``truncated.py`` (TF's truncated normal and the draw both initializers share),
``bert.py`` (the module initializer and its depth scaling), ``_checks.py`` (argument checks).
"""

from .bert import RESIDUAL_NAMES, bert_, scale_residual_
from .truncated import TF_TRUNCATED_STD_RATIO, trunc_normal_tf_

__all__ = ["TF_TRUNCATED_STD_RATIO", "RESIDUAL_NAMES", "trunc_normal_tf_", "bert_", "scale_residual_"]
