"""GlobalPointer layers: ``EfficientGlobalPointer``, ``GlobalPointer`` and ``GPLinker``.

Constructor arguments and parameter names follow bert4torch's layers (``bert4torch.layers``,
version 0.6), so that a bert4torch state dict loads as it is (:meth:`load_bert4torch`):

- ``EfficientGlobalPointer``: ``p_dense: Linear(hidden, 2 * head_size)``; its output h is split into
  contiguous halves ``q = h[..., :head_size]``, ``k = h[..., head_size:]`` (bert4keras splits it
  interleaved, ``q = h[..., 0::2]``, ``k = h[..., 1::2]``); ``q_dense: Linear(2 * head_size, 2 * heads)``
  on the un-rotated h gives, halved, type t's START bias on channel 2t and END bias on channel 2t+1
  (bert4keras: even channel END, odd channel START; kexue.fm/archives/8877).
- ``GlobalPointer``: ``dense: Linear(hidden, heads * 2 * head_size)``, cut into ``heads`` contiguous
  chunks of ``2 * head_size``, each ``[q | k]``.

Every layer returns scores ``(B, heads, L, L)`` from :func:`kexue.ops.global_pointer_scores`, and has
``loss`` (the fused :func:`kexue.ops.global_pointer_loss`: the scores are never formed) and
``decode`` (spans above a threshold, formed in row chunks). Differences from bert4torch: spans
below the diagonal are ``-inf`` (bert4torch subtracts 1e12), which every loss and decoder treats
alike; RoPE positions are always 0..L-1 (no ``position_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kexue.ops.global_pointer import global_pointer_decode, global_pointer_loss, global_pointer_scores


def _rope_arg(rope: bool, layout: str):
    return layout if rope else False


class _PointerBase(nn.Module):
    """Shared plumbing: ``_inputs(x) -> (q, k, start_bias, end_bias)`` in the ops' layout."""

    heads: int
    head_size: int

    def __init__(
        self,
        heads: int,
        head_size: int,
        RoPE: bool,
        tril_mask: bool,
        rope_layout: str,  # noqa: N803
        rope_base: float,
    ):
        super().__init__()
        if not (isinstance(heads, int) and heads > 0):
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if not (isinstance(head_size, int) and head_size > 0) or (RoPE and head_size % 2):
            raise ValueError(f"head_size must be a positive int (even with RoPE), got {head_size!r}")
        self.heads, self.head_size = heads, head_size
        self.RoPE, self.tril_mask = bool(RoPE), bool(tril_mask)
        self.rope_layout, self.rope_base = rope_layout, float(rope_base)

    def _inputs(self, x: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def _kw(self) -> dict:
        return {
            "rope": _rope_arg(self.RoPE, self.rope_layout),
            "tril_mask": self.tril_mask,
            "rope_base": self.rope_base,
        }

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x (B, L, hidden)``, ``mask (B, L)`` nonzero at tokens -> scores ``(B, heads, L, L)``."""
        kw = self._kw()
        return global_pointer_scores(*self._inputs(x), mask, kw["rope"], kw["tril_mask"], rope_base=kw["rope_base"])

    def loss(self, x: Tensor, labels, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """The multilabel cross-entropy of the spans, fused (no ``(B, heads, L, L)`` tensor).

        ``labels``: dense ``(B, heads, L, L)`` bool or sparse ``(N, 4)`` rows ``(b, type, start, end)``.
        """
        kw = self._kw()
        return global_pointer_loss(
            *self._inputs(x), labels, mask, kw["rope"], kw["tril_mask"], reduction=reduction, rope_base=kw["rope_base"]
        )

    @torch.no_grad()
    def decode(self, x: Tensor, mask: Tensor | None = None, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
        """Spans scoring above ``threshold``: ``(index (N, 4) = (b, type, start, end), score (N,))``."""
        kw = self._kw()
        return global_pointer_decode(
            *self._inputs(x), mask, kw["rope"], kw["tril_mask"], threshold=threshold, rope_base=kw["rope_base"]
        )

    def load_bert4torch(self, source: nn.Module | Mapping[str, Tensor], strict: bool = True):
        """Copy the weights of the same bert4torch layer (a module or its ``state_dict()``).

        The parameter names and channel conventions are bert4torch's (module docstring), so the
        tensors load unchanged; bert4torch's non-persistent RoPE buffers are ignored.
        """
        state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
        state = {k: v for k, v in state.items() if not k.startswith("position_embedding.")}
        return self.load_state_dict(state, strict=strict)


class EfficientGlobalPointer(_PointerBase):
    """Efficient GlobalPointer (kexue.fm/archives/8877): one q/k pair shared by every type, plus a
    start and an end bias per type.

    Args (bert4torch's): hidden_size, heads (entity types), head_size, RoPE, use_bias, tril_mask.
    ``max_len`` is accepted for older bert4torch signatures and unused (no cache is needed).
    ``rope_layout``: ``"interleaved"`` (bert4torch / bert4keras) or ``"half"``.
    """

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        head_size: int = 64,
        RoPE: bool = True,  # noqa: N803
        use_bias: bool = True,
        tril_mask: bool = True,
        *,
        max_len: int | None = None,
        rope_layout: str = "interleaved",
        rope_base: float = 10000.0,
    ):
        super().__init__(heads, head_size, RoPE, tril_mask, rope_layout, rope_base)
        self.p_dense = nn.Linear(hidden_size, head_size * 2, bias=use_bias)
        self.q_dense = nn.Linear(head_size * 2, heads * 2, bias=use_bias)

    def _inputs(self, x: Tensor):
        h = self.p_dense(x)
        q, k = h[..., : self.head_size], h[..., self.head_size :]
        bias = self.q_dense(h).unflatten(-1, (self.heads, 2)) / 2  # (B, L, heads, 2): start, end
        return q, k, bias[..., 0], bias[..., 1]


class GlobalPointer(_PointerBase):
    """GlobalPointer (kexue.fm/archives/8373): one q/k pair per type, no biases.

    Args (bert4torch's): hidden_size, heads, head_size, RoPE, use_bias, tril_mask; ``max_len``,
    ``rope_layout``, ``rope_base`` as in :class:`EfficientGlobalPointer`.
    """

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        head_size: int = 64,
        RoPE: bool = True,  # noqa: N803
        use_bias: bool = True,
        tril_mask: bool = True,
        *,
        max_len: int | None = None,
        rope_layout: str = "interleaved",
        rope_base: float = 10000.0,
    ):
        super().__init__(heads, head_size, RoPE, tril_mask, rope_layout, rope_base)
        self.dense = nn.Linear(hidden_size, heads * head_size * 2, bias=use_bias)

    def _inputs(self, x: Tensor):
        h = self.dense(x).unflatten(-1, (self.heads, 2 * self.head_size))  # (B, L, heads, 2 * head_size)
        return h[..., : self.head_size], h[..., self.head_size :], None, None


class GPLinker(nn.Module):
    """GPLinker (kexue.fm/archives/8888): entity-relation extraction with three pointers.

    - ``entity``: 2 types (subject, object), RoPE and the tril mask on;
    - ``head`` / ``tail``: one type per predicate scoring (subject head, object head) and
      (subject tail, object tail), without RoPE and without the tril mask.

    Args:
        hidden_size, predicates, head_size: sizes.
        efficient: use :class:`EfficientGlobalPointer` (the default, ~300K parameters at BERT
            base) or :class:`GlobalPointer` for the three pointers.
    """

    def __init__(self, hidden_size: int, predicates: int, head_size: int = 64, *, efficient: bool = True):
        super().__init__()
        pointer = EfficientGlobalPointer if efficient else GlobalPointer
        self.entity = pointer(hidden_size, 2, head_size)
        self.head = pointer(hidden_size, predicates, head_size, RoPE=False, tril_mask=False)
        self.tail = pointer(hidden_size, predicates, head_size, RoPE=False, tril_mask=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``(B, 2, L, L)``, ``(B, P, L, L)``, ``(B, P, L, L)``."""
        return self.entity(x, mask), self.head(x, mask), self.tail(x, mask)

    def loss(self, x: Tensor, entity_labels, head_labels, tail_labels, mask: Tensor | None = None) -> Tensor:
        """Sum of the three pointers' losses, each summed over types and averaged over the batch
        (as the GPLinker example). Labels dense or sparse ``(N, 4)`` rows, as in the pointers."""
        total = x.new_zeros(())
        for pointer, labels in ((self.entity, entity_labels), (self.head, head_labels), (self.tail, tail_labels)):
            per = pointer.loss(x, labels, mask, reduction="none")  # (B, types)
            total = total + per.sum(1).mean()
        return total

    @torch.no_grad()
    def decode(self, x: Tensor, mask: Tensor | None = None, threshold: float = 0.0) -> list[set]:
        """Triples per batch element: ``{((s_start, s_end), predicate, (o_start, o_end))}``.

        Subjects and objects are the entity spans above ``threshold``; a triple needs both the
        head pair (s_start, o_start) and the tail pair (s_end, o_end) of its predicate above it.
        """
        ent, _ = self.entity.decode(x, mask, threshold)
        head, _ = self.head.decode(x, mask, threshold)
        tail, _ = self.tail.decode(x, mask, threshold)
        batch = x.shape[0]
        subjects = [[] for _ in range(batch)]
        objects = [[] for _ in range(batch)]
        for b, t, i, j in ent.tolist():
            (subjects if t == 0 else objects)[b].append((i, j))
        heads = [dict() for _ in range(batch)]
        tails = [dict() for _ in range(batch)]
        for table, rows in ((heads, head), (tails, tail)):
            for b, p, i, j in rows.tolist():
                table[b].setdefault((i, j), set()).add(p)
        out = []
        for b in range(batch):
            triples = set()
            for sh, st in subjects[b]:
                for oh, ot in objects[b]:
                    for p in heads[b].get((sh, oh), set()) & tails[b].get((st, ot), set()):
                        triples.add(((sh, st), p, (oh, ot)))
            out.append(triples)
        return out
