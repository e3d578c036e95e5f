"""BioHash / FlyVec: ``kexue.ops.biohash``, ``biohash_update``, ``hamming_topk`` and their custom ops.

The math is in shared/spec/biohash.md; the contract every backend follows (activation order, ties,
bit layout) is documented in :mod:`kexue.reference.biohash`.

Custom ops (``torch.ops.kexue.*``), each dispatched to the backend :mod:`kexue._backend` picks:

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

import importlib.util
import numbers

import torch
from torch import Tensor

from kexue import _backend
from kexue.reference import biohash as reference

OP_HASH = "biohash"
OP_ACTIVATIONS = "biohash_activations"
OP_TOPK = "biohash_topk"
OP_UPDATE = "biohash_update"
OP_HAMMING = "biohash_hamming"

SYNAPSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UPDATE_DTYPES = (torch.float32, torch.float64)
ACTIVATION_DTYPES = (torch.float32, torch.float64)
PREC = reference.PREC
TINY = reference.TINY


# --------------------------------------------------------------------------------------------
# Backends. Every implementation takes validated, contiguous tensors; synapses as (N, K).


def _torch_hash(indices, offsets, weights, synapses_t, k, packed):
    return reference.biohash_sparse(indices, offsets, weights, synapses_t.t(), k, packed)


def _torch_activations(indices, offsets, weights, synapses_t):
    return reference.activations_sparse(indices, offsets, weights, synapses_t.t())


def _torch_update(indices, offsets, weights, synapses_t, lr, delta, rank, prec, tiny):
    # synapses_t.t() is a view: the reference's in-place copy_ lands in synapses_t.
    return reference.biohash_update_(indices, offsets, weights, synapses_t.t(), lr, delta, rank, prec, tiny)


def _triton_module():
    from kexue.triton_kernels import biohash

    return biohash


def _register_backends() -> None:
    _backend.register(OP_HASH, "torch", _torch_hash, SYNAPSE_DTYPES)
    _backend.register(OP_ACTIVATIONS, "torch", _torch_activations, SYNAPSE_DTYPES)
    _backend.register(OP_TOPK, "torch", reference.codes_from_activations, ACTIVATION_DTYPES)
    _backend.register(OP_UPDATE, "torch", _torch_update, UPDATE_DTYPES)
    _backend.register(OP_HAMMING, "torch", reference.hamming_topk, (torch.uint8,))
    native = _backend.native()
    if native is not None and hasattr(native, "biohash_sparse_cpu"):
        _backend.register(OP_HASH, "cpu", native.biohash_sparse_cpu, SYNAPSE_DTYPES)
        _backend.register(OP_ACTIVATIONS, "cpu", native.biohash_activations_cpu, SYNAPSE_DTYPES)
        _backend.register(OP_TOPK, "cpu", native.biohash_topk_cpu, ACTIVATION_DTYPES)
        _backend.register(OP_UPDATE, "cpu", native.biohash_update_cpu, UPDATE_DTYPES)
        _backend.register(OP_HAMMING, "cpu", native.hamming_topk_cpu, (torch.uint8,))
    if native is not None and hasattr(native, "biohash_sparse_cuda"):  # built with CUDA
        _backend.register(OP_HASH, "cuda", native.biohash_sparse_cuda, SYNAPSE_DTYPES)
        _backend.register(OP_ACTIVATIONS, "cuda", native.biohash_activations_cuda, SYNAPSE_DTYPES)
        _backend.register(OP_TOPK, "cuda", native.biohash_topk_cuda, ACTIVATION_DTYPES)
        _backend.register(OP_HAMMING, "cuda", native.hamming_topk_cuda, (torch.uint8,))
    if native is not None and hasattr(native, "biohash_update_cuda"):
        _backend.register(OP_UPDATE, "cuda", native.biohash_update_cuda, UPDATE_DTYPES)
    # Registered lazily (importing triton is slow); the kernels live in triton_kernels/biohash.py.
    if importlib.util.find_spec("kexue.triton_kernels.biohash") is None:
        return
    _backend.register(OP_HASH, "triton", lambda *a: _triton_module().biohash_sparse(*a),
                      (torch.float16, torch.bfloat16, torch.float32))
    _backend.register(OP_HAMMING, "triton", lambda *a: _triton_module().hamming_topk(*a), (torch.uint8,))
    _backend.register(OP_UPDATE, "triton", lambda *a: _triton_module().biohash_update(*a), (torch.float32,))


_register_backends()


# --------------------------------------------------------------------------------------------
# Custom ops.


def _num_rows(offsets: Tensor) -> int:
    return offsets.shape[0] - 1


@torch.library.custom_op("kexue::biohash_sparse", mutates_args=())
def biohash_sparse_op(indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses_t: Tensor, k: int,
                      packed: bool) -> Tensor:
    """CSR rows -> codes: uint8 ``(B, ceil(K/8))`` packed, or ``(B, K)`` of 0/1."""
    _, fn = _backend.select(OP_HASH, synapses_t)
    return fn(indices, offsets, weights, synapses_t, k, packed)


@biohash_sparse_op.register_fake
def _(indices, offsets, weights, synapses_t, k, packed):
    num_hidden = synapses_t.shape[1]
    width = reference.code_bytes(num_hidden) if packed else num_hidden
    return synapses_t.new_empty((_num_rows(offsets), width), dtype=torch.uint8)


@torch.library.custom_op("kexue::biohash_activations", mutates_args=())
def biohash_activations_op(indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses_t: Tensor) -> Tensor:
    """CSR rows -> ``(B, K)`` activations in the compute dtype."""
    _, fn = _backend.select(OP_ACTIVATIONS, synapses_t)
    return fn(indices, offsets, weights, synapses_t)


@biohash_activations_op.register_fake
def _(indices, offsets, weights, synapses_t):
    ct = reference.compute_dtype(synapses_t.dtype)
    return synapses_t.new_empty((_num_rows(offsets), synapses_t.shape[1]), dtype=ct)


@torch.library.custom_op("kexue::biohash_topk", mutates_args=())
def biohash_topk_op(activations: Tensor, k: int, packed: bool) -> Tensor:
    """``(B, K)`` activations -> codes (winner-take-all of the k largest, ties to the lowest index)."""
    _, fn = _backend.select(OP_TOPK, activations)
    return fn(activations, k, packed)


@biohash_topk_op.register_fake
def _(activations, k, packed):
    num_hidden = activations.shape[1]
    width = reference.code_bytes(num_hidden) if packed else num_hidden
    return activations.new_empty((activations.shape[0], width), dtype=torch.uint8)


@torch.library.custom_op("kexue::biohash_update", mutates_args=("synapses_t",))
def biohash_update_op(indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses_t: Tensor, lr: float,
                      delta: float, rank: int, prec: float, tiny: float) -> tuple[Tensor, Tensor]:
    """One FlyVec minibatch step in place on ``synapses_t (N, K)``; returns ``(winners, s_win)``."""
    _, fn = _backend.select(OP_UPDATE, synapses_t)
    return fn(indices, offsets, weights, synapses_t, lr, delta, rank, prec, tiny)


@biohash_update_op.register_fake
def _(indices, offsets, weights, synapses_t, lr, delta, rank, prec, tiny):
    rows = _num_rows(offsets)
    return offsets.new_empty((rows,), dtype=torch.int64), synapses_t.new_empty((rows,))


@torch.library.custom_op("kexue::hamming_topk", mutates_args=())
def hamming_topk_op(queries: Tensor, database: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Packed codes ``(Q, nb)``, ``(D, nb)`` -> the n nearest: ``(distances, indices)``, ``(Q, n)`` int64."""
    _, fn = _backend.select(OP_HAMMING, queries)
    return fn(queries, database, n)


@hamming_topk_op.register_fake
def _(queries, database, n):
    shape = (queries.shape[0], n)
    return queries.new_empty(shape, dtype=torch.int64), queries.new_empty(shape, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Input checks. Value checks (ids in range, offsets, empty windows) read the data, so they are
# skipped while torch.compile traces; shapes and dtypes are always checked.


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must lie in {bound}, got {value}")
    return value


def _check_synapses(synapses, allowed=SYNAPSE_DTYPES) -> Tensor:
    """Validate ``synapses (K, N)`` and return the ``(N, K)`` contiguous view (or copy) the kernels read."""
    if not isinstance(synapses, Tensor):
        raise TypeError(f"synapses must be a torch.Tensor, got {type(synapses).__name__}")
    if synapses.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"synapses must have dtype {names}; got {synapses.dtype}")
    if synapses.dim() != 2 or synapses.shape[0] < 1 or synapses.shape[1] < 1:
        raise ValueError(f"synapses must be a (K, N) matrix with K, N >= 1, got shape {tuple(synapses.shape)}")
    return synapses.t().contiguous()  # a no-op for input-major storage


def _csr(indices, offsets_or_mask, weights, num_inputs: int, device: torch.device,
         weight_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate a sparse batch and return it as CSR: ``indices (nnz,)``, ``offsets (B+1,)`` int64,
    ``weights (nnz,)`` in ``weight_dtype`` or None.

    Two spellings are accepted:
    - CSR: ``indices (nnz,)`` and ``offsets (B+1,)`` with ``offsets[0] = 0``, non-decreasing,
      ``offsets[-1] = nnz``; ``weights (nnz,)``.
    - padded: ``indices (B, L)`` and a bool ``mask (B, L)`` of valid positions (None: all valid);
      ``weights (B, L)``.
    """
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must have dtype int64 or int32; got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but synapses are on {device}")
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
        if weights.shape != indices.shape:
            raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}, "
                             f"got {tuple(weights.shape)}")
        if weights.device != device:
            raise ValueError(f"weights is on {weights.device} but synapses are on {device}")
    if indices.dim() == 2:
        rows, width = indices.shape
        mask = offsets_or_mask
        if mask is None:
            lengths = torch.full((rows,), width, dtype=torch.int64, device=device)
            flat_ids = indices.reshape(-1)
            flat_w = None if weights is None else weights.reshape(-1)
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError("with 2-D indices, offsets_or_mask must be a bool mask (B, L) or None, got "
                                f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
            if mask.shape != indices.shape:
                raise ValueError(f"mask must have the shape of indices {tuple(indices.shape)}, "
                                 f"got {tuple(mask.shape)}")
            lengths = mask.sum(1)
            flat_ids = indices[mask]
            flat_w = None if weights is None else weights[mask]
        offsets = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths, 0, out=offsets[1:])
    elif indices.dim() == 1:
        offsets = offsets_or_mask
        if not isinstance(offsets, Tensor):
            raise TypeError(f"with 1-D indices, offsets_or_mask must be the CSR offsets, a (B+1,) int64 tensor, "
                            f"got {type(offsets).__name__}")
        if offsets.dtype not in (torch.int64, torch.int32) or offsets.dim() != 1 or offsets.shape[0] < 1:
            raise ValueError(f"offsets must be a (B+1,) int64 tensor, got {offsets.dtype} of shape "
                             f"{tuple(offsets.shape)}")
        if offsets.device != device:
            raise ValueError(f"offsets is on {offsets.device} but synapses are on {device}")
        offsets = offsets.to(torch.int64)
        flat_ids, flat_w = indices, weights
    else:
        raise ValueError(f"indices must be (nnz,) with CSR offsets or (B, L) with a mask, got shape "
                         f"{tuple(indices.shape)}")
    if not torch.compiler.is_compiling():
        # One reduction over the row lengths and one over the ids: on a 10,000-window batch the
        # separate passes these checks used to make cost 7% of a single-threaded hashing call.
        lengths = offsets[1:] - offsets[:-1]
        shortest = int(lengths.min()) if lengths.numel() else 1
        if int(offsets[0]) != 0 or int(offsets[-1]) != flat_ids.shape[0] or shortest < 0:
            raise ValueError(f"offsets must start at 0, never decrease and end at nnz = {flat_ids.shape[0]}; "
                             f"got {offsets.tolist() if offsets.numel() <= 12 else 'a longer tensor'}")
        if shortest == 0:
            row = int(torch.nonzero(lengths == 0)[0, 0])
            raise ValueError(f"row {row} of the batch has no tokens (an empty window); every row needs at least one")
        if flat_ids.numel() > 0:
            low, high = (int(x) for x in torch.aminmax(flat_ids))
            if low < 0 or high >= num_inputs:
                bad = low if low < 0 else high
                raise ValueError(f"indices must lie in [0, N) = [0, {num_inputs}) for synapses of N = {num_inputs} "
                                 f"inputs; found {bad}")
    flat_ids = flat_ids.to(torch.int64).contiguous()
    if flat_w is not None:
        flat_w = flat_w.to(weight_dtype).contiguous()
    return flat_ids, offsets.contiguous(), flat_w


# --------------------------------------------------------------------------------------------
# Public functions.


def new_synapses(num_hidden: int, num_inputs: int, *, std: float = 0.02, mean: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None, generator: torch.Generator | None = None) -> Tensor:
    """Synapses ``(K, N)`` ~ N(mean, std^2) (FlyVec's init: mu = 0, sigma = 0.02), stored input-major
    (``.t()`` of a contiguous ``(N, K)``), the layout the kernels read without a copy."""
    _check_int("num_hidden", num_hidden, 1)
    _check_int("num_inputs", num_inputs, 1)
    wt = torch.randn(num_inputs, num_hidden, dtype=dtype, device=device, generator=generator)
    return (wt.mul_(std).add_(mean)).t()


def biohash(indices: Tensor, offsets_or_mask: Tensor | None, weights: Tensor | None, synapses: Tensor, k: int,
            packed: bool = True) -> Tensor:
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
    synapses_t = _check_synapses(synapses)
    num_hidden, num_inputs = synapses.shape
    k = _check_int("k", k, 1, num_hidden)
    ct = reference.compute_dtype(synapses.dtype)
    ids, offsets, w = _csr(indices, offsets_or_mask, weights, num_inputs, synapses.device, ct)
    return biohash_sparse_op(ids, offsets, w, synapses_t, k, bool(packed))


def biohash_activations(indices: Tensor, offsets_or_mask: Tensor | None, weights: Tensor | None,
                        synapses: Tensor) -> Tensor:
    """The activations ``(B, K)`` that :func:`biohash` ranks (same arguments, same summation
    order), in float32 (float64 for float64 synapses)."""
    synapses_t = _check_synapses(synapses)
    ct = reference.compute_dtype(synapses.dtype)
    ids, offsets, w = _csr(indices, offsets_or_mask, weights, synapses.shape[1], synapses.device, ct)
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
    _check_synapses(synapses)
    num_hidden, num_inputs = synapses.shape
    if x.dim() != 2 or x.shape[1] != num_inputs:
        raise ValueError(f"x must be (B, N) with N = {num_inputs} (the synapses' inputs), got {tuple(x.shape)}")
    if x.device != synapses.device:
        raise ValueError(f"x is on {x.device} but synapses are on {synapses.device}")
    k = _check_int("k", k, 1, num_hidden)
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
    k = _check_int("k", k, 1, activations.shape[1])
    return biohash_topk_op(activations.contiguous(), k, bool(packed))


def biohash_update(indices: Tensor, offsets_or_mask: Tensor | None, weights: Tensor | None, synapses: Tensor,
                   lr: float, *, delta: float = 0.0, rank: int = 2, prec: float = PREC,
                   tiny: float = TINY) -> tuple[Tensor, Tensor]:
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
    synapses_t = _check_synapses(synapses, UPDATE_DTYPES)
    num_hidden, num_inputs = synapses.shape
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr >= 0:
        raise ValueError(f"lr must be a non-negative float, got {lr!r}")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a float, got {type(delta).__name__}")
    rank = _check_int("rank", rank, 1, num_hidden)
    if not (isinstance(prec, numbers.Real) and prec > 0):
        raise ValueError(f"prec must be a positive float, got {prec!r}")
    if not (isinstance(tiny, numbers.Real) and tiny >= 0):
        raise ValueError(f"tiny must be a non-negative float, got {tiny!r}")
    ct = reference.compute_dtype(synapses.dtype)
    ids, offsets, w = _csr(indices, offsets_or_mask, weights, num_inputs, synapses.device, ct)
    out = biohash_update_op(ids, offsets, w, synapses_t, float(lr), float(delta), rank, float(prec), float(tiny))
    if not synapses.t().is_contiguous():  # synapses_t was a copy: write the step back
        synapses.copy_(synapses_t.t())
    return out


def biohash_schedule(epoch: int, epochs: int, lr0: float = 0.002, delta0: float = 0.0) -> tuple[float, float]:
    """FlyVec's per-epoch schedules (spec §1.3, item 9): ``lr = lr0 * (1 - epoch/epochs)`` (linear
    to 0) and ``delta = delta0 * 0.5 * (1 + tanh((epoch - 0.125 * epochs) / 10))``."""
    import math

    epochs = _check_int("epochs", epochs, 1)
    epoch = _check_int("epoch", epoch, 0, epochs)
    lr = lr0 * (1.0 - epoch / epochs)
    delta = delta0 * 0.5 * (1.0 + math.tanh((epoch - 0.125 * epochs) / 10.0))
    return lr, delta


def biohash_energy(indices: Tensor, offsets_or_mask: Tensor | None, weights: Tensor | None,
                   synapses: Tensor) -> Tensor:
    """The energy of spec §1.2 of a batch, a float64 scalar (lower is better):
    ``E = -sum_b <W_mu_b, v_b/p> / ||W_mu_b||`` with ``mu_b = argmax_mu <W_mu, v_b>``."""
    _check_synapses(synapses)
    ids, offsets, w = _csr(indices, offsets_or_mask, weights, synapses.shape[1], synapses.device, torch.float64)
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
        raise ValueError(f"queries and database must have the same width, got {queries.shape[1]} "
                         f"and {database.shape[1]}")
    if queries.device != database.device:
        raise ValueError(f"queries is on {queries.device} but database is on {database.device}")
    n = _check_int("n", n, 0, database.shape[0])
    if metric == "hamming":
        if queries.dtype != torch.uint8 or database.dtype != torch.uint8:
            raise TypeError(f"metric='hamming' takes packed uint8 codes; got {queries.dtype} and {database.dtype}")
        return hamming_topk_op(queries.contiguous(), database.contiguous(), n)
    if metric == "cosine":
        if not (queries.is_floating_point() and database.is_floating_point()):
            raise TypeError(f"metric='cosine' takes floating vectors; got {queries.dtype} and {database.dtype}")
        return reference.cosine_topk(queries, database, n)
    raise ValueError(f"metric must be 'hamming' or 'cosine', got {metric!r}")
