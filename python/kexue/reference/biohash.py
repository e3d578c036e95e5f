"""BioHash / FlyVec in plain PyTorch: the oracle, and the ``torch`` backend of hashing and the step.

Conventions shared with the kernels (csrc/include/kexue/biohash.h, csrc/cpu/biohash_rows.h):

Synapses ``W`` have shape ``(K, N)``: K hidden units ("Kenyon cells"), N input dimensions (for
FlyVec N = 2V: context words in ``[0, V)``, the target word in ``[V, 2V)``).

Sparse inputs are CSR rows: ``indices (nnz,)`` int64 input ids, ``offsets (B+1,)`` int64 with row b
holding ``indices[offsets[b]:offsets[b+1]]``, and optional per-token ``weights (nnz,)`` (None: 1).
A repeated id counts twice, as in the official trainer (the input is a count vector).

Activation of unit mu for row b: ``a[b, mu] = sum_j w_j * W[mu, idx_j]``, summed token by token in
row order, in the compute dtype (float32 for 16/32-bit synapses, float64 for float64). The kernels
add in the same order with the same roundings (no fused multiply-add), so hashes agree bit for bit
with this reference run in the same dtype.

Winner-take-all (the hash): the k units with the largest activations, ties broken by the lowest
unit index; NaN ranks above every number (as in ``torch.sort``), -0.0 equals +0.0. Exactly k bits
are set in every code.

Packed codes: ``uint8 (B, ceil(K/8))``, little-endian bit order, as kexue/_biohash_codes.py defines
them (the packing and Hamming helpers here are that module's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue._biohash_codes import code_bytes, hamming_distances, pack_bits, unpack_bits  # noqa: F401  (layout contract)

# The official trainer's constants (flyvec/src/cu_special_reduction.cu): the step is scaled by
# lr / max(max|ds|, PREC), and an element whose scaled change is at most TINY in magnitude is left as is.
PREC = 1e-30
TINY = 1e-10


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype activations accumulate in for synapses of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# Activations.


def _padded(indices: Tensor, offsets: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """CSR rows as a padded ``(B, L)`` batch: ids (0 in the padding), validity mask, weights."""
    lengths = offsets[1:] - offsets[:-1]
    rows = lengths.shape[0]
    width = int(lengths.max()) if rows > 0 and indices.numel() > 0 else 0
    pos = torch.arange(width, device=indices.device)
    mask = pos[None, :] < lengths[:, None]
    flat = (offsets[:-1, None] + pos[None, :]).clamp_max(max(indices.numel() - 1, 0))
    ids = torch.where(mask, indices[flat], 0) if indices.numel() > 0 else flat
    w = None if weights is None else (torch.where(mask, weights[flat], 0) if indices.numel() > 0 else None)
    return ids, mask, w


def activations_sparse(indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses: Tensor) -> Tensor:
    """``(B, K)`` activations of CSR rows, in the compute dtype, summed token by token in row order."""
    ct = compute_dtype(synapses.dtype)
    num_hidden = synapses.shape[0]
    ids, mask, w = _padded(indices, offsets, weights)
    wt = synapses.t()  # (N, K): row i is the column of input i
    acc = torch.zeros(ids.shape[0], num_hidden, dtype=ct, device=synapses.device)
    for j in range(ids.shape[1]):
        col = wt[ids[:, j]].to(ct)
        if w is not None:
            col = w[:, j, None].to(ct) * col
        # Padding adds nothing: the row keeps its value (acc + 0 would turn -0.0 into +0.0).
        acc = torch.where(mask[:, j, None], acc + col, acc)
    return acc


def activations_dense(x: Tensor, synapses: Tensor) -> Tensor:
    """``(B, K)`` activations ``x @ W^T`` of dense inputs ``x (B, N)``, in the compute dtype."""
    ct = compute_dtype(synapses.dtype)
    return torch.matmul(x.to(ct), synapses.to(ct).t())


# --------------------------------------------------------------------------------------------
# Winner-take-all and bit packing.


def ranked(act: Tensor) -> Tensor:
    """Unit indices of each row, best first: by activation descending, ties by lowest index."""
    return torch.sort(act, dim=-1, descending=True, stable=True).indices


def topk_mask(act: Tensor, k: int) -> Tensor:
    """``(B, K)`` bool: the k winners of each row (exactly k, ties to the lowest index)."""
    winners = ranked(act)[:, :k]
    mask = torch.zeros(act.shape, dtype=torch.bool, device=act.device)
    return mask.scatter_(1, winners, True)


def codes_from_activations(act: Tensor, k: int, packed: bool) -> Tensor:
    """The hash of activations: packed uint8 codes, or a dense uint8 0/1 ``(B, K)``."""
    mask = topk_mask(act, k)
    return pack_bits(mask) if packed else mask.to(torch.uint8)


def biohash_sparse(
    indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses: Tensor, k: int, packed: bool
) -> Tensor:
    return codes_from_activations(activations_sparse(indices, offsets, weights, synapses), k, packed)


def biohash_dense(x: Tensor, synapses: Tensor, k: int, packed: bool) -> Tensor:
    return codes_from_activations(activations_dense(x, synapses), k, packed)


def midpoint_hash(act: Tensor, k: int) -> Tensor:
    """The ``flyvec`` package's binarisation (flyvec/core.py): threshold halfway between the k-th
    and (k+1)-th largest activation, ``bit = act > thr``. Equals :func:`topk_mask` when those two
    activations differ; with a tie there it sets fewer than k bits. Requires k < K."""
    top = torch.sort(act, dim=-1, descending=True).values
    thr = (top[:, k - 1] + top[:, k]) / 2.0
    return act > thr[:, None]


# --------------------------------------------------------------------------------------------
# The learning rule (spec §1.3, the official trainer's minibatch step, p = 2).


def biohash_update_(
    indices: Tensor,
    offsets: Tensor,
    weights: Tensor | None,
    synapses: Tensor,
    lr: float,
    delta: float = 0.0,
    rank: int = 2,
    prec: float = PREC,
    tiny: float = TINY,
) -> tuple[Tensor, Tensor]:
    """One minibatch step of the FlyVec/BioHash rule, in place on ``synapses``.

    With ``s = a(weights)`` the frequency-scaled activations and ``r = a(1)`` the raw ones:

    1. winner ``w_b = argmax_mu r[b, mu]`` (the raw input picks it, spec §1.2), and, when
       ``delta != 0``, the unit ranked ``rank``-th, ``m_b`` (the anti-Hebbian term);
    2. ``xx[mu] = sum_{b: w_b = mu} s[b, mu] - delta * sum_{b: m_b = mu} s[b, mu]``;
    3. ``ds[mu, :] = -xx[mu] * W[mu, :]``, then for every token j of row b:
       ``ds[w_b, idx_j] += weight_j`` and ``ds[m_b, idx_j] -= delta * weight_j``;
       rows with ``xx[mu] == 0`` get no update at all (as in the official multi-GPU reduction);
    4. ``W += lr / max(max|ds|, prec) * ds``, leaving elements whose change is ``<= tiny`` in magnitude.

    Returns ``(winners (B,) int64, scaled activation of each winner (B,))``; the energy of the
    batch before the step is ``-sum_b s_win[b] / ||W[w_b]||``.
    """
    ct = compute_dtype(synapses.dtype)
    num_hidden = synapses.shape[0]
    rows = offsets.shape[0] - 1
    device = synapses.device
    scaled = activations_sparse(indices, offsets, weights, synapses)
    raw = scaled if weights is None else activations_sparse(indices, offsets, None, synapses)
    order = ranked(raw)
    arange = torch.arange(rows, device=device)
    winners = order[:, 0].contiguous() if num_hidden > 0 else torch.zeros(rows, dtype=torch.long, device=device)
    s_win = scaled[arange, winners]
    lengths = offsets[1:] - offsets[:-1]
    w = torch.ones(indices.shape, dtype=ct, device=device) if weights is None else weights.to(ct)

    # xx and the Hebbian term, sample by sample (the kernels' order: winner, then the ranked unit).
    xx = torch.zeros(num_hidden, dtype=ct, device=device)
    hebb = torch.zeros(num_hidden, synapses.shape[1], dtype=ct, device=device)
    token_rows = torch.repeat_interleave(arange, lengths)
    xx.index_put_((winners,), s_win, accumulate=True)
    hebb.index_put_((winners[token_rows], indices), w, accumulate=True)
    if delta != 0.0:
        second = order[:, rank - 1]
        xx.index_put_((second,), -delta * scaled[arange, second], accumulate=True)
        hebb.index_put_((second[token_rows], indices), -delta * w, accumulate=True)

    active = xx != 0
    ds = (-xx)[:, None] * synapses.to(ct) + hebb
    ds = torch.where(active[:, None], ds, 0.0)
    nc = ds.abs().max() if ds.numel() > 0 else torch.zeros((), dtype=ct, device=device)
    prec_t = torch.tensor(prec, dtype=ct, device=device)
    scale = torch.tensor(lr, dtype=ct, device=device) / torch.maximum(nc, prec_t)
    change = scale * ds
    moved = change.abs() > tiny
    synapses.copy_(torch.where(moved, synapses.to(ct) + change, synapses.to(ct)).to(synapses.dtype))
    return winners, s_win


def biohash_energy(indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses: Tensor) -> Tensor:
    """The energy of spec §1.2 over a set of rows (float64 scalar):
    ``E = -sum_b <W_w, v_b/p> / ||W_w||`` with ``w = argmax_mu <W_mu, v_b>`` (raw input)."""
    w64 = synapses.double()
    scaled = activations_sparse(indices, offsets, None if weights is None else weights.double(), w64)
    raw = activations_sparse(indices, offsets, None, w64)
    winners = ranked(raw)[:, 0]
    norms = torch.linalg.vector_norm(w64, dim=1)
    s_win = scaled[torch.arange(scaled.shape[0]), winners]
    return -(s_win / norms[winners]).sum()


# --------------------------------------------------------------------------------------------
# Nearest neighbours.


def hamming_topk(queries: Tensor, database: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n nearest codes of each query: ``(distances (Q, n) int64, indices (Q, n) int64)``,
    nearest first, ties broken by the lowest database index."""
    dist = hamming_distances(queries, database)
    order = torch.sort(dist, dim=-1, stable=True).indices[:, :n].contiguous()
    return dist.gather(1, order), order


def cosine_topk(queries: Tensor, database: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n most cosine-similar dense vectors: ``(similarities (Q, n), indices (Q, n) int64)``,
    most similar first, ties by the lowest index. Zero vectors have similarity 0 to everything."""
    ct = compute_dtype(torch.promote_types(queries.dtype, database.dtype))
    q = torch.nn.functional.normalize(queries.to(ct), dim=-1)
    d = torch.nn.functional.normalize(database.to(ct), dim=-1)
    sim = q @ d.t()
    order = ranked(sim)[:, :n].contiguous()
    return sim.gather(1, order), order
