"""Finding embedding tables, for the embedding-drift guard of Lion and Tiger.

Under sign optimizers a token row that stops receiving gradient keeps being pushed by
sign(stale momentum) towards -sign(m)/weight_decay (+-100 for weight_decay 0.01): the embedding
anomaly of kexue.fm/archives/9736. Groups marked
``embedding=True`` (with ``drift_guard=True``, the default) leave such rows where they are.
"""

from __future__ import annotations

from torch import nn

EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)


def find_embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every ``nn.Embedding`` / ``nn.EmbeddingBag`` in ``model`` (each once)."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, EMBEDDING_MODULES) and module.weight.requires_grad:
            found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def embedding_param_groups(model: nn.Module, **embedding_options) -> list[dict]:
    """Two param groups for Lion/Tiger: the model's embedding tables (``embedding=True``) and the rest.

    ``embedding_options`` go to the embedding group only (e.g. ``freeze_absent_momentum=True``,
    ``drift_guard=False``, or a learning rate of its own). Parameters are passed with their names.
    Tied weights (an embedding reused as the output projection) get a dense gradient every step,
    so the guard never holds a row back there; it costs one check per row.
    """
    embedding_ids = {id(p) for p in find_embedding_weights(model)}
    tables, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (tables if id(p) in embedding_ids else others).append((name, p))
    groups = []
    if others:
        groups.append({"params": others})
    if tables:
        groups.append({"params": tables, "embedding": True, **embedding_options})
    return groups
