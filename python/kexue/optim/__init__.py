"""Optimizers (``torch.optim.Optimizer`` subclasses): Lion and Tiger with one fused step.

Helpers: :func:`embedding_param_groups` / :func:`find_embedding_weights` (the embedding-drift
guard), :func:`tiger_param_groups` and :func:`piecewise_linear` (Tiger's tensor kinds and lr
schedule), :class:`FisherInformation` (ChildTuning-D masks).
"""

from kexue.optim.child_tuning import FisherInformation
from kexue.optim.embedding_guard import embedding_param_groups, find_embedding_weights
from kexue.optim.lion import Lion
from kexue.optim.tiger import Tiger, piecewise_linear, tiger_param_groups

__all__ = [
    "Lion",
    "Tiger",
    "FisherInformation",
    "embedding_param_groups",
    "find_embedding_weights",
    "piecewise_linear",
    "tiger_param_groups",
]
