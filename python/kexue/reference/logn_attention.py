"""Log-n (entropy-invariant) attention in plain PyTorch: the oracle and the ``torch`` backend.

Shapes: ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (query head ``h``
reads key/value head ``h // (Hq // Hkv)``: grouped-query and multi-query attention);
``key_padding_mask (B, Lk)`` bool, True marks a padding key that no query may see (the
convention of ``nn.MultiheadAttention``). Arithmetic runs in ``promote_types(q.dtype, float32)``:
float64 inputs give the oracle. The math is docs/logn_attention.md; the rules:

* ``n_i``, the number of keys query ``i`` may see: the unpadded keys ``j`` with, when causal,
  ``j <= i + (Lk - Lq)`` (absolute position ``i + Lk - Lq`` of a query after a KV cache).
* Row scale ``base * factor(n_i)`` with ``base = scale`` (default ``1/sqrt(D)``) and
  ``factor(n) = ln(max(n, min_n, 1)) / ln(train_len)`` (``max(1, .)`` with ``clip``; 1 when not
  ``logn``). ``scale="gradmax"`` uses instead ``alpha*(n) / sqrt(D)``, the root of
  ``exp(a^2) (1 + 2 a^2) = n`` (the gradient-maximising scale of kexue.fm/archives/9812), per
  query.
* ``out_i = softmax_j(s_ij) v_j`` with ``s_ij = scale_i q_i.k_j`` over the visible keys, and
  ``lse_i = log sum_j exp(s_ij)`` (natural log, of the scaled logits, as flash-attention returns).
* A query that sees no key (all keys padded, or a causal query before the first key) gets a zero
  output and ``lse = 0``, a finite value chosen so that the backward's ``exp(s - lse)`` is 0 there;
  its gradients are zero.
* NaN in a query propagates to that query's output; NaN in a key or value propagates to every
  query that sees it (and may reach others: a hidden key's weight is 0, and 0 * NaN is NaN).

Packed variable-length sequences (the flash-attn ``varlen`` layout): ``q (total_q, Hq, D)``,
``k, v (total_k, Hkv, D)``, sequence ``s`` holding query rows ``cu_seqlens_q[s] ..
cu_seqlens_q[s+1]`` and key rows ``cu_seqlens_k[s] .. cu_seqlens_k[s+1]``; ``lse (Hq, total_q)``.
Each sequence is one batch row of the dense op: its queries see only its keys, ``n_i`` counts
them (non-causal: the sequence's key count; causal: the query's position in its sequence plus the
sequence's ``Lk - Lq`` plus one). :func:`logn_attention_varlen_forward` is literally that loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GRADMAX = "gradmax"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in for inputs of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def gradmax_alpha(n: Tensor) -> Tensor:
    """``alpha*`` with ``exp(a^2)(1 + 2a^2) = n`` for ``n >= 1`` (0 at n = 1), elementwise.

    Newton on ``x = a^2``: ``f(x) = x + log(1 + 2x) - log n`` is increasing and concave, so Newton
    from the left (x = 0) climbs monotonically to the root. The same iteration as the kernels'
    (csrc/include/kexue/logn_attention.h).
    """
    log_n = torch.log(torch.clamp(n, min=1.0))
    x = torch.zeros_like(log_n)
    for _ in range(30):
        f = x + torch.log1p(2 * x) - log_n
        x = x - f / (1 + 2 / (1 + 2 * x))
    return torch.sqrt(x)


def visible_keys(batch: int, lq: int, lk: int, causal: bool, key_padding_mask: Tensor | None, device=None) -> Tensor:
    """``n (B, Lq)`` int64: how many keys each query may see (see the module docstring)."""
    if key_padding_mask is None:
        valid_prefix = torch.arange(1, lk + 1, device=device).expand(batch, lk)
    else:
        valid_prefix = torch.cumsum((~key_padding_mask).long(), dim=-1)
    valid_prefix = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=valid_prefix.device), valid_prefix], -1)
    if causal:
        # keys 0 .. i + lk - lq are visible: the prefix count at index i + lk - lq + 1, clamped.
        last = torch.arange(lq, device=valid_prefix.device) + (lk - lq) + 1
        last = last.clamp(0, lk)
        return valid_prefix[:, last]
    return valid_prefix[:, lk:].expand(batch, lq).contiguous()


def row_scales(
    n: Tensor, head_dim: int, scale, train_len: float, logn: bool, clip: bool, min_n: float, dtype: torch.dtype
) -> Tensor:
    """Per-query softmax scale ``(B, Lq)`` from the visible-key counts ``n (B, Lq)``."""
    n = torch.clamp(n.to(dtype), min=max(1.0, float(min_n)))
    if isinstance(scale, str):
        return gradmax_alpha(n) / math.sqrt(head_dim)
    base = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not logn:
        return torch.full_like(n, base)
    factor = torch.log(n) / math.log(train_len)
    if clip:
        factor = torch.clamp(factor, min=1.0)
    return base * factor


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _visibility(batch: int, lq: int, lk: int, causal: bool, key_padding_mask: Tensor | None, device) -> Tensor:
    """``(B, 1, Lq, Lk)`` bool: True where query i may see key j."""
    allowed = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def _scores(q, k, scales, allowed):
    s = scales[:, None, :, None] * (q @ k.transpose(-1, -2))
    return torch.where(allowed, s, -math.inf)


def logn_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq) in the compute dtype)``.

    Differentiable by autograd (gradcheck runs on it); :func:`logn_attention_backward` is the same
    gradient written out, step for step as the kernels compute it.
    """
    ct = compute_dtype(q.dtype)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    qc, kc, vc = q.to(ct), _expand_kv(k.to(ct), hq // hkv), _expand_kv(v.to(ct), hq // hkv)
    n = visible_keys(b, lq, lk, causal, key_padding_mask, q.device)
    scales = row_scales(n, d, scale, train_len, logn, clip, min_n, ct)
    allowed = _visibility(b, lq, lk, causal, key_padding_mask, q.device)
    s = _scores(qc, kc, scales, allowed)
    empty = (n == 0)[:, None, :]  # (B, 1, Lq): rows that see no key
    # exp(s - lse) with lse taken as 0 on empty rows, where every s is -inf.
    # (logsumexp of an all -inf row is -inf and its backward NaN: feed it zeros there instead.)
    lse = torch.where(empty, 0.0, torch.logsumexp(torch.where(empty[..., None], 0.0, s), dim=-1))
    p = torch.exp(s - lse[..., None])
    out = p @ vc
    return out.to(q.dtype), lse


def logn_attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)`` typed like the inputs, recomputing ``P`` from ``lse``.

    ``P = exp(s - lse)``; ``delta_i = sum_d dO_i O_i - dlse_i``; ``dS = P (dO V^T - delta)``;
    ``dQ_i = scale_i dS_i K``; ``dK = dS^T (scale * Q)``; ``dV = P^T dO``; the query heads of a
    group are summed into their key/value head.
    """
    ct = compute_dtype(q.dtype)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    qc, kc, vc = q.to(ct), _expand_kv(k.to(ct), groups), _expand_kv(v.to(ct), groups)
    do, o = grad_out.to(ct), out.to(ct)
    n = visible_keys(b, lq, lk, causal, key_padding_mask, q.device)
    scales = row_scales(n, d, scale, train_len, logn, clip, min_n, ct)
    allowed = _visibility(b, lq, lk, causal, key_padding_mask, q.device)
    p = torch.exp(_scores(qc, kc, scales, allowed) - lse[..., None].to(ct))
    delta = (do * o).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(ct)
    ds = p * (do @ vc.transpose(-1, -2) - delta[..., None])
    qs = scales[:, None, :, None] * qc
    dq = scales[:, None, :, None] * (ds @ kc)
    dk = ds.transpose(-1, -2) @ qs
    dv = p.transpose(-1, -2) @ do
    if groups > 1:
        dk = dk.reshape(b, hkv, groups, lk, d).sum(2)
        dv = dv.reshape(b, hkv, groups, lk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def logn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale=None,
    train_len: float = 512,
    logn: bool = True,
    clip: bool = False,
    min_n: float = 1,
    key_padding_mask: Tensor | None = None,
    return_lse: bool = False,
):
    """Plain-PyTorch log-n attention with the public signature of :func:`kexue.ops.logn_attention`.

    No input checks (the ops layer does them). Differentiable by autograd.
    """
    out, lse = logn_attention_forward(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Packed variable-length sequences: one dense call per sequence.


def _as_list(cu) -> list[int]:
    return [int(x) for x in (cu.tolist() if isinstance(cu, Tensor) else cu)]


def _dense(t: Tensor, start: int, end: int) -> Tensor:
    """Rows ``start .. end`` of a packed ``(T, H, D)`` tensor as a dense ``(1, H, L, D)`` view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _packed(t: Tensor) -> Tensor:
    """A dense ``(1, H, L, D)`` tensor back as packed rows ``(L, H, D)``."""
    return t.squeeze(0).transpose(0, 1)


def logn_attention_varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q,
    cu_seqlens_k,
    causal: bool,
    scale,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
) -> tuple[Tensor, Tensor]:
    """``(out (total_q, Hq, D) in q's dtype, lse (Hq, total_q) in the compute dtype)``.

    ``cu_seqlens_q``, ``cu_seqlens_k``: ``(nseq + 1,)`` offsets (tensors or lists). Each sequence
    goes through :func:`logn_attention_forward` as a batch of one; differentiable by autograd.
    """
    cq, ck = _as_list(cu_seqlens_q), _as_list(cu_seqlens_k)
    outs, lses = [q.new_empty(0, q.shape[1], q.shape[2])], [q.new_empty(q.shape[1], 0, dtype=compute_dtype(q.dtype))]
    for s in range(len(cq) - 1):
        if cq[s + 1] == cq[s]:
            continue  # an empty sequence has no output rows
        out, lse = logn_attention_forward(
            _dense(q, cq[s], cq[s + 1]),
            _dense(k, ck[s], ck[s + 1]),
            _dense(v, ck[s], ck[s + 1]),
            None,
            causal,
            scale,
            train_len,
            logn,
            clip,
            min_n,
        )
        outs.append(_packed(out))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def logn_attention_varlen_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q,
    cu_seqlens_k,
    causal: bool,
    scale,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)`` of :func:`logn_attention_varlen_forward`, one
    :func:`logn_attention_backward` per sequence (keys of a sequence without queries get zeros)."""
    cq, ck = _as_list(cu_seqlens_q), _as_list(cu_seqlens_k)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        gl = None if grad_lse is None else grad_lse[None, :, q0:q1]
        g = logn_attention_backward(
            _dense(grad_out, q0, q1),
            gl,
            _dense(q, q0, q1),
            _dense(k, k0, k1),
            _dense(v, k0, k1),
            _dense(out, q0, q1),
            lse[None, :, q0:q1],
            None,
            causal,
            scale,
            train_len,
            logn,
            clip,
            min_n,
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = _packed(g[0]), _packed(g[1]), _packed(g[2])
    return dq, dk, dv


def logn_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens,
    *,
    cu_seqlens_k=None,
    causal: bool = False,
    scale=None,
    train_len: float = 512,
    logn: bool = True,
    clip: bool = False,
    min_n: float = 1,
    return_lse: bool = False,
):
    """Plain-PyTorch log-n attention over packed sequences (see the module docstring); the
    varlen form of :func:`kexue.ops.logn_attention`. No input checks. Differentiable by autograd."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    out, lse = logn_attention_varlen_forward(q, k, v, cu_seqlens, cu_k, causal, scale, train_len, logn, clip, min_n)
    return (out, lse) if return_lse else out
