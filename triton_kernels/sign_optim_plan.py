"""Sign optimizers, Triton side: the launch plan, kept between steps, and the per-step tables.

A plan says which programs each launch runs: work items of at most CHUNK elements (whole rows for
tensors updated row by row), one launch per (param dtype, momentum dtype, vector width), the
pre-pass items of the tensors that need one, and each tensor's span of partial sums for the
finishing kernels. It depends only on the call's structure (sizes, dtypes, alignment, the flags
that decide which passes run, row lengths, NaN-guard groups), so it is built once and found again
at every later step (:func:`prepare`); a new parameter, dtype, group or structural option builds a
new one. What changes from step to step (the tensors' addresses, the learning rate and every
other coefficient, the UPDATE switch, the random keys) is not in it: those three tables go to the
device at each step in one host-to-device copy from page-locked memory that does not wait
(``non_blocking``), and not at all when they are what the previous step uploaded. A step on CUDA
therefore never synchronises the host with the device; in capturable mode nothing is copied
after the first step, as CUDA graph capture requires.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch

from .sign_optim_layout import (
    _CODES,
    ALIGN,
    CHUNK,
    DYNAMIC,
    FLAGS,
    LAZY_ROWS,
    NAN_GROUP,
    NUM_ADDRS,
    NUM_FLOATS,
    NUM_INTS,
    RMS_CARRIED,
    RMS_ROW,
    RMS_TENSOR,
    ROW_LEN,
    SSQ_OUT,
    vector_width,
)

# The flags a plan depends on (which tensors get a pre-pass, are swept by rows, hand on a sum).
# UPDATE is not among them: on Tiger's accumulation micro-steps it is cleared, and the kernels
# read it at run time, so the plan serves both kinds of micro-step.
STRUCTURAL_FLAGS = RMS_TENSOR | RMS_ROW | LAZY_ROWS | SSQ_OUT | RMS_CARRIED | DYNAMIC


def _items(tensors: list[int], numels: list[int], row_lens: list[int]) -> tuple[list[tuple], list[tuple]]:
    """Work items ``[tensor, begin, end]`` of CHUNK elements (whole rows where ``row_lens[t]``),
    and for each tensor ``(tensor, first item, item count, numel)``."""
    items, spans = [], []
    for t in tensors:
        n, row_len = numels[t], row_lens[t]
        step = max(1, CHUNK // row_len) * row_len if row_len > 0 else CHUNK
        spans.append((t, len(items), -(-n // step), n))
        items.extend((t, b, min(n, b + step)) for b in range(0, n, step))
    return items, spans


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait: on CUDA through page-locked memory and
    a non-blocking copy (a copy from pageable memory waits for the stream to drain). The pinned
    block comes from torch's caching host allocator, which does not hand it out again before the
    copy has run."""
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "sign_optim_step (triton): the step tables changed while a CUDA graph was being captured; "
            "run one step of the capturable optimizer before capturing"
        )
    return host.pin_memory().to(device, non_blocking=True)


def _pack(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """int64 vectors end to end, each starting at a multiple of 16 bytes (so every slice of the
    device copy is aligned, and Triton's specialization on aligned pointers never varies)."""
    offsets, pieces, at = [], [], 0
    for part in parts:
        offsets.append(at)
        pad = -part.numel() % 2
        pieces += [part.reshape(-1), torch.zeros(pad, dtype=torch.int64)]
        at += part.numel() + pad
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64), offsets


def _rows(rows: list[tuple], width: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, width)


@dataclass
class Plan:
    """The launches of one call structure, and the per-step tables last uploaded for it."""

    num_tensors: int
    prepass: list[tuple[int, int, int, torch.Tensor]]  # (param code, vec, first slot, items) per launch
    prepass_slots: int
    spans: torch.Tensor | None  # per tensor: (tensor, first slot, slot count, numel), for _finish_kernel
    steps: list[tuple[int, int, int, int, torch.Tensor]]  # (param code, momentum code, vec, first slot, items)
    step_slots: int
    outs: torch.Tensor | None  # per whole-tensor SSQ_OUT tensor: its span of step slots, for _ssq_out_kernel
    staged: bytes | None = None  # the host tables of the last upload
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # addr, hyper, ints on the device


def tensor_vector_width(p, g, m, mask, row_len: int) -> int:
    """The VEC a tensor is served with: the 16-byte width of its storage when every address it
    is read through is a multiple of 16 bytes and its row length (if any) a multiple of that
    width, else 1 (scalar accesses; a view at an odd offset, a gradient inside a flat bucket)."""
    vec = vector_width(_CODES[p.dtype], _CODES[m.dtype])
    addrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), 0 if mask is None else mask.data_ptr())
    if any(a % ALIGN for a in addrs) or row_len % vec:
        return 1
    return vec


def build_plan(device: torch.device, structure: tuple) -> Plan:
    """The plan of a call whose :func:`structure_key` is ``(device, structure)``."""
    T = len(structure)
    numels = [s[0] for s in structure]
    flags = [s[4] for s in structure]
    for t, f in enumerate(flags):
        if f & DYNAMIC and f & (SSQ_OUT | RMS_CARRIED):
            raise ValueError(
                f"sign_optim_step (triton): tensor {t}: carried sums of squares are not served "
                f"in capturable mode (DYNAMIC rows)"
            )
    # Row-wise work items only where the kernel goes row by row (as by_rows() in C++).
    row_lens = [s[6] if s[6] > 0 and s[4] & (RMS_ROW | LAZY_ROWS) else 0 for s in structure]
    buckets: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for t, (n, pdtype, mdtype, vec, *_rest) in enumerate(structure):
        if n > 0:
            buckets[(_CODES[pdtype], _CODES[mdtype], vec)].append(t)

    # Tensors that may need lr * RMS(theta); whether this step does (UPDATE) is read in the kernels.
    def needs_rms(t: int) -> bool:
        return bool(flags[t] & RMS_TENSOR)

    def wants_prepass(t: int) -> bool:
        return (needs_rms(t) and not flags[t] & RMS_CARRIED) or structure[t][5] >= 0

    # One partial sum and NaN flag per pre-pass item, all buckets in one buffer; each bucket writes
    # its slice, then _finish_kernel reads every tensor's span of it (an empty span for a tensor whose
    # sum of squares is carried and that has no NaN guard).
    spans, prepass, pre_items, total = [], [], [], 0
    by_param: dict[tuple[int, int], list[int]] = defaultdict(list)
    for (pcode, _, vec), ts in buckets.items():
        by_param[(pcode, vec)] += ts
    for (pcode, vec), ts in by_param.items():
        pre = [t for t in ts if wants_prepass(t)]
        if pre:
            items, bucket_spans = _items(pre, numels, [0] * T)
            spans += [(t, total + first, count, n) for t, first, count, n in bucket_spans]
            prepass.append((pcode, vec, total))
            pre_items.append(_rows(items, 3))
            total += len(items)
        spans += [(t, total, 0, numels[t]) for t in ts if needs_rms(t) and not wants_prepass(t)]
    # One partial sum per step item likewise, for the tensors that hand on a whole-tensor sum.
    steps, step_items, outs, slots = [], [], [], 0
    for (pcode, mcode, vec), ts in buckets.items():
        items, bucket_spans = _items(ts, numels, row_lens)
        outs += [
            (t, slots + first, count, n)
            for t, first, count, n in bucket_spans
            if flags[t] & SSQ_OUT and not row_lens[t]
        ]
        steps.append((pcode, mcode, vec, slots))
        step_items.append(_rows(items, 3))
        slots += len(items)
    # Everything in one upload; the launches read slices of it.
    parts = [*pre_items, *step_items, _rows(spans, 4), _rows(outs, 4)]
    host, offsets = _pack(parts)
    dev = _upload(host, device)
    views = [dev[o : o + p.numel()].view(p.shape) for o, p in zip(offsets, parts, strict=True)]
    n_pre = len(pre_items)
    return Plan(
        T,
        [(*launch, items) for launch, items in zip(prepass, views[:n_pre], strict=True)],
        total,
        views[-2] if spans else None,
        [(*launch, items) for launch, items in zip(steps, views[n_pre:-2], strict=True)],
        slots,
        views[-1] if outs else None,
    )


def structure_key(params, grads, exp_avgs, masks, ints_rows: list[list[int]]) -> tuple:
    """What a plan depends on, per tensor: numel, dtypes, vector width, structural flags, NaN-guard
    group, row length. Not the addresses, nor any coefficient."""
    return tuple(
        (
            p.numel(),
            p.dtype,
            m.dtype,
            tensor_vector_width(p, g, m, mk, r[ROW_LEN]),
            r[FLAGS] & STRUCTURAL_FLAGS,
            r[NAN_GROUP],
            r[ROW_LEN],
        )
        for p, g, m, mk, r in zip(params, grads, exp_avgs, masks, ints_rows, strict=True)
    )


# Plans by (device, structure). A model's step has one structure (two while Tiger's carried sums
# start: the first step reads theta, the next ones carry), so a handful of entries is plenty.
_PLANS: OrderedDict[tuple, Plan] = OrderedDict()
_MAX_PLANS = 16


def clear_plans() -> None:
    """Forget every plan (tests; a plan holds device memory for its work items)."""
    _PLANS.clear()


def _staged(params, grads, exp_avgs, masks, row_seen, ssq, rows_f, rows_i) -> tuple[bytes, list[int]]:
    """The per-step tables as the bytes of one int64 buffer: addresses (T x 6), coefficients
    (T x 9 float64), flags (T x 8), each region starting at a multiple of 16 bytes; and the
    regions' offsets in elements. Built from Python values (no tensor is read), so comparing two
    steps' tables costs no tensor op either."""
    T = len(params)
    addrs = [
        a
        for p, g, m, mk, s, q in zip(params, grads, exp_avgs, masks, row_seen, ssq, strict=True)
        for a in (
            p.data_ptr(),
            g.data_ptr(),
            m.data_ptr(),
            0 if mk is None else mk.data_ptr(),
            s.data_ptr() if s.numel() > 0 else 0,
            q.data_ptr() if q.numel() > 0 else 0,
        )
    ]
    sizes = [NUM_ADDRS * T, NUM_FLOATS * T, NUM_INTS * T]
    pads = [n % 2 for n in sizes]
    blob = struct.pack(
        f"<{sizes[0] + pads[0]}q{sizes[1] + pads[1]}d{sizes[2] + pads[2]}q",
        *addrs,
        *[0] * pads[0],
        *(x for row in rows_f for x in row),
        *[0.0] * pads[1],
        *(x for row in rows_i for x in row),
        *[0] * pads[2],
    )
    offsets = [0, sizes[0] + pads[0], sizes[0] + pads[0] + sizes[1] + pads[1]]
    return blob, offsets


def prepare(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, capturable: bool = False) -> tuple[Plan, tuple]:
    """The plan of this call (built only if its structure is new) and the device copies of its
    address, coefficient and flag tables (uploaded only if they differ from the last ones).

    ``capturable``: the tables are part of the key too, so the device tables a captured CUDA
    graph reads are never replaced by another optimizer's of the same structure.
    """
    device = params[0].device
    T = len(params)
    rows_i = ints.to(torch.int64).tolist()
    rows_f = hyper.to(torch.float64).tolist()
    blob, offsets = _staged(params, grads, exp_avgs, masks, row_seen, ssq, rows_f, rows_i)
    key = (device, structure_key(params, grads, exp_avgs, masks, rows_i))
    if capturable:
        key += (blob,)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = build_plan(device, key[1])
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    if plan.staged != blob:
        dev = _upload(torch.frombuffer(bytearray(blob), dtype=torch.int64), device)
        shapes = [(T, NUM_ADDRS), (T, NUM_FLOATS), (T, NUM_INTS)]
        addr, hyper_d, ints_d = (dev[o : o + a * b].view(a, b) for o, (a, b) in zip(offsets, shapes, strict=True))
        plan.staged, plan.tables = blob, (addr, hyper_d.view(torch.float64), ints_d)
    return plan, plan.tables
