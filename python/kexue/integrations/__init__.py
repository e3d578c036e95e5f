"""Integrations with other libraries.

``kexue.patch`` / ``kexue.unpatch`` put kexue's attention into a built Hugging Face transformers
model (:mod:`kexue.integrations.transformers`). transformers is imported only when they are called,
so kexue does not depend on it.
"""

from __future__ import annotations


def patch(model, attention: str = "logn", **kwargs):
    """Run ``model``'s attention through kexue; see :func:`kexue.integrations.transformers.patch`."""
    from kexue.integrations import transformers as hf

    return hf.patch(model, attention, **kwargs)


def unpatch(model):
    """Undo :func:`patch`; see :func:`kexue.integrations.transformers.unpatch`."""
    from kexue.integrations import transformers as hf

    return hf.unpatch(model)


__all__ = ["patch", "unpatch"]
