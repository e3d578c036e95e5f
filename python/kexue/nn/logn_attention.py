"""``LogNAttention``: multi-head attention with the log-n scale, a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kexue.ops.logn_attention import logn_attention


class LogNAttention(nn.Module):
    """Multi-head attention (projections, :func:`kexue.ops.logn_attention`, output projection).

    Called like ``nn.MultiheadAttention``: ``forward(query, key, value, key_padding_mask=...)``
    returns ``(output, None)`` (attention weights are never formed). With ``logn=False`` and
    weights copied by :meth:`from_multihead_attention` it computes what ``nn.MultiheadAttention``
    does.

    Shapes (``batch_first=True``): query ``(B, Lq, E)``, key ``(B, Lk, kdim)``, value
    ``(B, Lk, vdim)``, key_padding_mask ``(B, Lk)`` bool with True marking padding; output
    ``(B, Lq, E)``. With ``batch_first=False`` the first two dimensions are swapped.

    Packed sequences (no padding): ``forward(query, key, value, cu_seqlens=..., max_seqlen=...)``
    with query ``(total_q, E)``, key ``(total_k, kdim)``, value ``(total_k, vdim)`` and the offsets
    of :func:`kexue.ops.logn_attention` (``cu_seqlens_k`` when the key rows differ); each sequence
    attends within itself and counts its own ``n``. Output ``(total_q, E)``; ``batch_first`` plays
    no part there.

    Args:
        embed_dim, num_heads, bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention``.
        num_kv_heads: key/value heads (default ``num_heads``); fewer gives grouped-query attention.
        causal, scale, train_len, logn, clip, min_n, allow_tf32: as :func:`kexue.ops.logn_attention`
            (``allow_tf32`` concerns the attention alone; the projections follow
            ``torch.backends.cuda.matmul.allow_tf32``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        causal: bool = False,
        scale: float | str | None = None,
        train_len: float = 512,
        logn: bool = True,
        clip: bool = False,
        min_n: float = 1,
        allow_tf32: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.causal, self.scale, self.train_len = causal, scale, train_len
        self.logn, self.clip, self.min_n = logn, clip, min_n
        if not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
        self.allow_tf32 = allow_tf32
        kv_dim = self.head_dim * num_kv_heads
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim or embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim or embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, **kwargs) -> LogNAttention:
        """A module with ``mha``'s projection weights (``batch_first`` taken from ``mha``)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        ref = mha.out_proj.weight
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=ref.device,
            dtype=ref.dtype,
            **kwargs,
        )
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in ((module.q_proj, wq), (module.k_proj, wk), (module.v_proj, wv)):
                proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for proj, b in zip(
                    (module.q_proj, module.k_proj, module.v_proj), mha.in_proj_bias.chunk(3), strict=False
                ):
                    proj.bias.copy_(b)
            module.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                module.out_proj.bias.copy_(mha.out_proj.bias)
        return module

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("LogNAttention never forms attention weights; call it with need_weights=False")
        if attn_mask is not None:
            raise ValueError("LogNAttention takes no attn_mask: use causal=True and/or key_padding_mask")
        key = query if key is None else key
        value = key if value is None else value
        causal = self.causal if is_causal is None else bool(is_causal)
        if cu_seqlens is not None:
            return self._packed(query, key, value, causal, cu_seqlens, cu_seqlens_k, max_seqlen), None
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"query, key, value must be 3-d (batch, seq, features), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        b, lq, _ = query.shape
        lk = key.shape[1]
        q = self.q_proj(query).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = logn_attention(
            q,
            k,
            v,
            causal=causal,
            scale=self.scale,
            train_len=self.train_len,
            logn=self.logn,
            clip=self.clip,
            min_n=self.min_n,
            key_padding_mask=key_padding_mask,
            allow_tf32=self.allow_tf32,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _packed(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        causal: bool,
        cu_seqlens: Tensor,
        cu_seqlens_k: Tensor | None,
        max_seqlen: int | None,
    ) -> Tensor:
        if query.dim() != 2 or key.dim() != 2 or value.dim() != 2:
            raise ValueError(
                f"with cu_seqlens, query, key, value must be 2-d (total rows, features), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if key.shape[0] != value.shape[0]:
            raise ValueError(f"key and value must have the same rows, got {key.shape[0]} and {value.shape[0]}")
        # The rows of the varlen layout are (total, heads, head_dim): a view of the projections.
        q = self.q_proj(query).view(query.shape[0], self.num_heads, self.head_dim)
        k = self.k_proj(key).view(key.shape[0], self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(value.shape[0], self.num_kv_heads, self.head_dim)
        out = logn_attention(
            q,
            k,
            v,
            causal=causal,
            scale=self.scale,
            train_len=self.train_len,
            logn=self.logn,
            clip=self.clip,
            min_n=self.min_n,
            cu_seqlens=cu_seqlens,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen=max_seqlen,
            allow_tf32=self.allow_tf32,
        )
        return self.out_proj(out.reshape(query.shape[0], self.embed_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"causal={self.causal}, train_len={self.train_len}, logn={self.logn}, clip={self.clip}, "
            f"min_n={self.min_n}, allow_tf32={self.allow_tf32}, batch_first={self.batch_first}"
        )
