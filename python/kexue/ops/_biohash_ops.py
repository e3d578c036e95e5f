"""The BioHash custom ops (``torch.ops.kexue.*``) and the backends that serve them.

Each op has one name, used for its custom op, its backend registry entry and its Python handle
here: ``biohash_sparse``, ``biohash_activations``, ``biohash_topk``, ``biohash_update`` and
``hamming_topk``. The handles are ``<name>_op``.

Every op that indexes the synapses with ids checks them in its body, right before the launch
(:func:`kexue.ops._biohash_inputs.check_rows`): the C++ CPU kernels check them themselves in the
same pass that reads them, so the body skips the check for them. Kernels take validated,
contiguous tensors, synapses as ``(N, K)``.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from kexue import _backend
from kexue._biohash_codes import code_bytes
from kexue.ops import _hamming_tiles
from kexue.ops._biohash_inputs import check_int, check_row_shapes, check_rows, check_update_scalars
from kexue.reference import biohash as reference

SYNAPSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UPDATE_DTYPES = (torch.float32, torch.float64)
ACTIVATION_DTYPES = (torch.float32, torch.float64)
# Backends whose kernels check ids and offsets themselves, in the pass that reads them
# (csrc/include/kexue/biohash_checks.h): the body checks only the shapes for them.
_SELF_CHECKING = frozenset({"cpu"})


def _torch_hash(indices, offsets, weights, synapses_t, k, packed):
    return reference.biohash_sparse(indices, offsets, weights, synapses_t.t(), k, packed)


def _torch_activations(indices, offsets, weights, synapses_t):
    return reference.activations_sparse(indices, offsets, weights, synapses_t.t())


def _torch_update(indices, offsets, weights, synapses_t, lr, delta, rank, prec, tiny):
    # synapses_t.t() is a view: the reference's in-place copy_ lands in synapses_t.
    return reference.biohash_update_(indices, offsets, weights, synapses_t.t(), lr, delta, rank, prec, tiny)


def _triton(module: str):
    """A Triton kernel module, imported on first use (importing triton is slow)."""
    return importlib.import_module(f"kexue.triton_kernels.{module}")


def _register_backends() -> None:
    register = _backend.register
    register("biohash_sparse", "torch", _torch_hash, SYNAPSE_DTYPES)
    register("biohash_activations", "torch", _torch_activations, SYNAPSE_DTYPES)
    register("biohash_topk", "torch", reference.codes_from_activations, ACTIVATION_DTYPES)
    register("biohash_update", "torch", _torch_update, UPDATE_DTYPES)
    register("hamming_topk", "torch", _hamming_tiles.hamming_topk_torch, (torch.uint8,))
    native = _backend.native()
    for device in ("cpu", "cuda"):
        if native is None or not hasattr(native, f"biohash_sparse_{device}"):
            continue
        register("biohash_sparse", device, getattr(native, f"biohash_sparse_{device}"), SYNAPSE_DTYPES)
        register("biohash_activations", device, getattr(native, f"biohash_activations_{device}"), SYNAPSE_DTYPES)
        register("biohash_topk", device, getattr(native, f"biohash_topk_{device}"), ACTIVATION_DTYPES)
        register("hamming_topk", device, getattr(native, f"hamming_topk_{device}"), (torch.uint8,))
        if hasattr(native, f"biohash_update_{device}"):
            register("biohash_update", device, getattr(native, f"biohash_update_{device}"), UPDATE_DTYPES)
    # Registered lazily: triton_kernels/{biohash,biohash_update,hamming}.py are imported on first use.
    if importlib.util.find_spec("kexue.triton_kernels.biohash") is None:
        return
    register(
        "biohash_sparse",
        "triton",
        lambda *a: _triton("biohash").biohash_sparse(*a),
        (torch.float16, torch.bfloat16, torch.float32),
    )
    register("biohash_update", "triton", lambda *a: _triton("biohash_update").biohash_update(*a), (torch.float32,))
    register("hamming_topk", "triton", lambda *a: _triton("hamming").hamming_topk(*a), (torch.uint8,))


def _declare_preferences() -> None:
    # Hashing sparse rows on CUDA tensors tries the CUDA C++ kernel before Triton: an H200 run in an
    # earlier session timed the Triton hash at 14.6 ms and the CUDA C++ one at 2.08 ms on the same
    # call (7x; docs/biohash.md, "Backends"). Triton stays the fallback for builds without CUDA.
    _backend.prefer("biohash_sparse", "cuda", ("cuda", "triton"))


_register_backends()
_declare_preferences()


def _select(op: str, indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses_t: Tensor):
    """The backend for an op over CSR rows, after the value checks its kernels rely on."""
    name, fn = _backend.select(op, synapses_t)
    if name in _SELF_CHECKING:
        check_row_shapes(indices, offsets, weights)  # for the same errors as the other backends
    else:
        check_rows(indices, offsets, weights, synapses_t.shape[0])
    return fn


def _num_rows(offsets: Tensor) -> int:
    return offsets.shape[0] - 1


@torch.library.custom_op("kexue::biohash_sparse", mutates_args=())
def biohash_sparse_op(
    indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses_t: Tensor, k: int, packed: bool
) -> Tensor:
    """CSR rows -> codes: uint8 ``(B, ceil(K/8))`` packed, or ``(B, K)`` of 0/1."""
    check_int("k", k, 1, synapses_t.shape[1])
    fn = _select("biohash_sparse", indices, offsets, weights, synapses_t)
    return fn(indices, offsets, weights, synapses_t, k, packed)


@biohash_sparse_op.register_fake
def _(indices, offsets, weights, synapses_t, k, packed):
    num_hidden = synapses_t.shape[1]
    width = code_bytes(num_hidden) if packed else num_hidden
    return synapses_t.new_empty((_num_rows(offsets), width), dtype=torch.uint8)


@torch.library.custom_op("kexue::biohash_activations", mutates_args=())
def biohash_activations_op(indices: Tensor, offsets: Tensor, weights: Tensor | None, synapses_t: Tensor) -> Tensor:
    """CSR rows -> ``(B, K)`` activations in the compute dtype."""
    fn = _select("biohash_activations", indices, offsets, weights, synapses_t)
    return fn(indices, offsets, weights, synapses_t)


@biohash_activations_op.register_fake
def _(indices, offsets, weights, synapses_t):
    ct = reference.compute_dtype(synapses_t.dtype)
    return synapses_t.new_empty((_num_rows(offsets), synapses_t.shape[1]), dtype=ct)


@torch.library.custom_op("kexue::biohash_topk", mutates_args=())
def biohash_topk_op(activations: Tensor, k: int, packed: bool) -> Tensor:
    """``(B, K)`` activations -> codes (winner-take-all of the k largest, ties to the lowest index)."""
    check_int("k", k, 1, activations.shape[1])
    _, fn = _backend.select("biohash_topk", activations)
    return fn(activations, k, packed)


@biohash_topk_op.register_fake
def _(activations, k, packed):
    num_hidden = activations.shape[1]
    width = code_bytes(num_hidden) if packed else num_hidden
    return activations.new_empty((activations.shape[0], width), dtype=torch.uint8)


@torch.library.custom_op("kexue::biohash_update", mutates_args=("synapses_t",))
def biohash_update_op(
    indices: Tensor,
    offsets: Tensor,
    weights: Tensor | None,
    synapses_t: Tensor,
    lr: float,
    delta: float,
    rank: int,
    prec: float,
    tiny: float,
) -> tuple[Tensor, Tensor]:
    """One FlyVec minibatch step in place on ``synapses_t (N, K)``; returns ``(winners, s_win)``."""
    check_update_scalars(lr, delta, rank, prec, tiny, synapses_t.shape[1])
    fn = _select("biohash_update", indices, offsets, weights, synapses_t)
    return fn(indices, offsets, weights, synapses_t, lr, delta, rank, prec, tiny)


@biohash_update_op.register_fake
def _(indices, offsets, weights, synapses_t, lr, delta, rank, prec, tiny):
    rows = _num_rows(offsets)
    return offsets.new_empty((rows,), dtype=torch.int64), synapses_t.new_empty((rows,))


@torch.library.custom_op("kexue::hamming_topk", mutates_args=())
def hamming_topk_op(queries: Tensor, database: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Packed codes ``(Q, nb)``, ``(D, nb)`` -> the n nearest: ``(distances, indices)``, ``(Q, n)`` int64."""
    if not 0 <= n <= database.shape[0]:
        raise ValueError(f"n must lie in [0, D] = [0, {database.shape[0]}], got {n}")
    _, fn = _backend.select("hamming_topk", queries)
    return fn(queries, database, n)


@hamming_topk_op.register_fake
def _(queries, database, n):
    shape = (queries.shape[0], n)
    return queries.new_empty(shape, dtype=torch.int64), queries.new_empty(shape, dtype=torch.int64)
