"""BioHash / FlyVec public functions: ``kexue.ops.biohash``, ``biohash_update``, ``hamming_topk``, ...

The contract every backend follows (activation order, ties, bit layout) is documented in
:mod:`kexue.reference.biohash`. Argument checks live in :mod:`kexue.ops._biohash_inputs`; the custom
ops and their backends in :mod:`kexue.ops._biohash_ops`:

- ``biohash_sparse(indices, offsets, weights?, synapses_t, k, packed) -> codes``
- ``biohash_activations(indices, offsets, weights?, synapses_t) -> (B, K)``
- ``biohash_topk(activations, k, packed) -> codes``  (the dense-input path, after a matmul)
- ``biohash_update(indices, offsets, weights?, synapses_t, lr, delta, rank, prec, tiny)
  -> (winners, winner activations)``, in place on ``synapses_t``
- ``hamming_topk(queries, database, n) -> (distances, indices)``

Synapse layout. The public functions take synapses ``W`` of shape ``(K, N)`` as in the spec. The
kernels read them input-major, as ``synapses_t = W.t()`` of shape ``(N, K)`` contiguous, so that
one token's K weights are one contiguous run. Store ``W`` as ``torch.empty(N, K).t()`` (what
:func:`new_synapses` and :mod:`kexue.flyvec` do) and no copy is ever made; a row-major ``W`` works
too, at the price of a transposed copy per call (and a copy back after :func:`biohash_update`).

Ties. Winner-take-all keeps exactly k units: the k largest activations, ties broken by the lowest
unit index (NaN ranks above every number). The winner of the learning rule is the top-ranked unit
by the same rule. Hamming search breaks distance ties by the lowest database index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kexue.ops._biohash_inputs import (
    SYNAPSE_DTYPES,
    check_int,
    check_rows,
    check_synapses,
    check_update_scalars,
    csr,
)
from kexue.ops._biohash_ops import (
    ACTIVATION_DTYPES,
    UPDATE_DTYPES,
    biohash_activations_op,
    biohash_sparse_op,
    biohash_topk_op,
    biohash_update_op,
    hamming_topk_op,
)
from kexue.reference import biohash as reference

__all__ = [
    "SYNAPSE_DTYPES",
    "biohash",
    "biohash_activations",
    "biohash_dense",
    "biohash_energy",
    "biohash_schedule",
    "biohash_topk",
    "biohash_update",
    "hamming_topk",
    "new_synapses",
]

PREC = reference.PREC
TINY = reference.TINY


# --------------------------------------------------------------------------------------------
# Public functions.


def new_synapses(
    num_hidden: int,
    num_inputs: int,
    *,
    std: float = 0.02,
    mean: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Synapses ``(K, N)`` ~ N(mean, std^2) (FlyVec's init: mu = 0, sigma = 0.02), stored input-major
    (``.t()`` of a contiguous ``(N, K)``), the layout the kernels read without a copy."""
    check_int("num_hidden", num_hidden, 1)
    check_int("num_inputs", num_inputs, 1)
    wt = torch.randn(num_inputs, num_hidden, dtype=dtype, device=device, generator=generator)
    return (wt.mul_(std).add_(mean)).t()


def biohash(
    indices: Tensor,
    offsets_or_mask: Tensor | None,
    weights: Tensor | None,
    synapses: Tensor,
    k: int,
    packed: bool = True,
) -> Tensor:
    r"""Binary hash of sparse inputs by winner-take-all (BioHash / FlyVec, spec §1.2).

    Row ``b`` is a bag of input ids ``idx_j`` with weights ``w_j`` (1 when ``weights`` is None);
    its activations are ``a[b, mu] = sum_j w_j * W[mu, idx_j]`` (a gather-sum: the dense input
    vector is never built; a repeated id counts twice), and its code sets the bits of the ``k``
    largest activations, ties to the lowest unit index, exactly ``k`` bits.

    Args:
        indices: int64/int32 ids in ``[0, N)``: ``(nnz,)`` with CSR ``offsets``, or ``(B, L)``
            with a bool mask. A floating ``(B, N)`` tensor instead is a dense input (then
            ``offsets_or_mask`` and ``weights`` must be None; see :func:`biohash_dense`).
        offsets_or_mask: CSR offsets ``(B+1,)`` for 1-D indices; for 2-D indices a bool mask
            ``(B, L)`` of valid positions, or None when every position is valid.
        weights: per-token weights shaped like ``indices`` (e.g. inverse word frequencies), or None.
        synapses: ``(K, N)`` float16/bfloat16/float32/float64; fastest stored input-major
            (:func:`new_synapses`).
        k: active units per code, ``1 <= k <= K``.
        packed: return ``uint8 (B, ceil(K/8))`` with unit mu in bit ``mu % 8`` of byte ``mu // 8``;
            else ``uint8 (B, K)`` of 0/1.

    Every row must hold at least one token. Activations accumulate in float32 (float64 for
    float64 synapses); for a given dtype every backend gives the same codes bit for bit.
    """
    if isinstance(indices, Tensor) and indices.is_floating_point():
        if offsets_or_mask is not None or weights is not None:
            raise ValueError("a dense (B, N) input takes no offsets_or_mask and no weights; pass None for both")
        return biohash_dense(indices, synapses, k, packed)
    synapses_t = check_synapses(synapses)
    k = check_int("k", k, 1, synapses.shape[0])
    ct = reference.compute_dtype(synapses.dtype)
    ids, offsets, w = csr(indices, offsets_or_mask, weights, synapses.device, ct)
    return biohash_sparse_op(ids, offsets, w, synapses_t, k, bool(packed))


def biohash_activations(
    indices: Tensor, offsets_or_mask: Tensor | None, weights: Tensor | None, synapses: Tensor
) -> Tensor:
    """The activations ``(B, K)`` that :func:`biohash` ranks (same arguments, same summation
    order), in float32 (float64 for float64 synapses)."""
    synapses_t = check_synapses(synapses)
    ct = reference.compute_dtype(synapses.dtype)
    ids, offsets, w = csr(indices, offsets_or_mask, weights, synapses.device, ct)
    return biohash_activations_op(ids, offsets, w, synapses_t)


def biohash_dense(x: Tensor, synapses: Tensor, k: int, packed: bool = True) -> Tensor:
    """:func:`biohash` of dense inputs ``x (B, N)``: activations ``x @ W^T`` (a matmul in the
    compute dtype), then the same winner-take-all."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(synapses, Tensor):
        raise TypeError(f"synapses must be a torch.Tensor, got {type(synapses).__name__}")
    check_synapses(synapses)
    num_hidden, num_inputs = synapses.shape
    if x.dim() != 2 or x.shape[1] != num_inputs:
        raise ValueError(f"x must be (B, N) with N = {num_inputs} (the synapses' inputs), got {tuple(x.shape)}")
    if x.device != synapses.device:
        raise ValueError(f"x is on {x.device} but synapses are on {synapses.device}")
    k = check_int("k", k, 1, num_hidden)
    act = reference.activations_dense(x, synapses).contiguous()
    return biohash_topk_op(act, k, bool(packed))


def biohash_topk(activations: Tensor, k: int, packed: bool = True) -> Tensor:
    """Winner-take-all codes of precomputed activations ``(B, K)`` (float32/float64)."""
    if not isinstance(activations, Tensor):
        raise TypeError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
    if activations.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"activations must have dtype float32 or float64; got {activations.dtype}")
    if activations.dim() != 2 or activations.shape[1] < 1:
        raise ValueError(f"activations must be (B, K) with K >= 1, got {tuple(activations.shape)}")
    k = check_int("k", k, 1, activations.shape[1])
    return biohash_topk_op(activations.contiguous(), k, bool(packed))


def biohash_update(
    indices: Tensor,
    offsets_or_mask: Tensor | None,
    weights: Tensor | None,
    synapses: Tensor,
    lr: float,
    *,
    delta: float = 0.0,
    rank: int = 2,
    prec: float = PREC,
    tiny: float = TINY,
) -> tuple[Tensor, Tensor]:
    r"""One minibatch step of the FlyVec/BioHash learning rule (spec §1.3), in place on ``synapses``.

    Per row b (same batch spellings as :func:`biohash`; ``weights`` are the 1/frequency factors
    ``1/p``, or None for p = 1): the winner ``mu_b`` is the unit with the largest *raw* activation
    ``<W_mu, v_b>`` (ties to the lowest index); with ``s_b = <W_mu_b, v_b/p>``,
    ``xx[mu] = sum_{b: mu_b = mu} s_b`` and
    ``ds[mu, i] = sum_{b: mu_b = mu} (v_b/p)_i - xx[mu] * W[mu, i]`` (Hebbian term minus Oja's
    decay, only on rows that won); then ``W += lr / max(max|ds|, prec) * ds``: the largest change
    of the step is exactly ``lr``, and changes of at most ``tiny`` are dropped (as the official
    trainer does). With ``delta != 0`` the unit ranked ``rank``-th is pushed away (anti-Hebbian,
    weight ``-delta``); FlyVec's default is ``delta = 0``.

    The learning rate schedule of the spec is :func:`biohash_schedule` (per epoch).

    Args:
        synapses: float32 or float64 ``(K, N)``, updated in place.
        lr: the step's largest change (FlyVec: 0.002 x the schedule), ``>= 0``.

    Returns:
        ``(winners (B,) int64, s_win (B,))``: each row's winner and its scaled activation
        before the step (the batch's energy is ``-sum s_win / ||W[winner]||``).
    """
    synapses_t = check_synapses(synapses, UPDATE_DTYPES)
    check_update_scalars(lr, delta, rank, prec, tiny, synapses.shape[0])
    ct = reference.compute_dtype(synapses.dtype)
    ids, offsets, w = csr(indices, offsets_or_mask, weights, synapses.device, ct)
    out = biohash_update_op(ids, offsets, w, synapses_t, float(lr), float(delta), int(rank), float(prec), float(tiny))
    if not synapses.t().is_contiguous():  # synapses_t was a copy: write the step back
        synapses.copy_(synapses_t.t())
    return out


def biohash_schedule(epoch: int, epochs: int, lr0: float = 0.002, delta0: float = 0.0) -> tuple[float, float]:
    """FlyVec's per-epoch schedules (FlyVec's trainer): ``lr = lr0 * (1 - epoch/epochs)`` (linear
    to 0) and ``delta = delta0 * 0.5 * (1 + tanh((epoch - 0.125 * epochs) / 10))``."""
    epochs = check_int("epochs", epochs, 1)
    epoch = check_int("epoch", epoch, 0, epochs)
    lr = lr0 * (1.0 - epoch / epochs)
    delta = delta0 * 0.5 * (1.0 + math.tanh((epoch - 0.125 * epochs) / 10.0))
    return lr, delta


def biohash_energy(indices: Tensor, offsets_or_mask: Tensor | None, weights: Tensor | None, synapses: Tensor) -> Tensor:
    """The energy of spec §1.2 of a batch, a float64 scalar (lower is better):
    ``E = -sum_b <W_mu_b, v_b/p> / ||W_mu_b||`` with ``mu_b = argmax_mu <W_mu, v_b>``."""
    check_synapses(synapses)
    ids, offsets, w = csr(indices, offsets_or_mask, weights, synapses.device, torch.float64)
    check_rows(ids, offsets, w, synapses.shape[1])  # the reference gathers with the ids
    return reference.biohash_energy(ids, offsets, w, synapses)


def hamming_topk(queries: Tensor, database: Tensor, n: int, *, metric: str = "hamming") -> tuple[Tensor, Tensor]:
    """The ``n`` nearest database entries of each query, nearest first, ties to the lowest index.

    ``metric="hamming"``: packed uint8 codes ``(Q, nb)`` and ``(D, nb)`` (from :func:`biohash`);
    distance = popcount of the XOR, computed on the packed bytes. Returns
    ``(distances (Q, n) int64, indices (Q, n) int64)``.

    ``metric="cosine"``: dense floating vectors ``(Q, K)`` and ``(D, K)`` (e.g. activations);
    returns ``(similarities (Q, n), indices (Q, n) int64)``, most similar first; a zero vector has
    similarity 0 to everything.
    """
    for name, t in (("queries", queries), ("database", database)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries and database must have the same width, got {queries.shape[1]} and {database.shape[1]}"
        )
    if queries.device != database.device:
        raise ValueError(f"queries is on {queries.device} but database is on {database.device}")
    n = check_int("n", n, 0, database.shape[0])
    if metric == "hamming":
        if queries.dtype != torch.uint8 or database.dtype != torch.uint8:
            raise TypeError(f"metric='hamming' takes packed uint8 codes; got {queries.dtype} and {database.dtype}")
        return hamming_topk_op(queries.contiguous(), database.contiguous(), n)
    if metric == "cosine":
        if not (queries.is_floating_point() and database.is_floating_point()):
            raise TypeError(f"metric='cosine' takes floating vectors; got {queries.dtype} and {database.dtype}")
        return reference.cosine_topk(queries, database, n)
    raise ValueError(f"metric must be 'hamming' or 'cosine', got {metric!r}")
