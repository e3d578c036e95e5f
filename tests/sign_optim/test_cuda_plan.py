"""The CUDA C++ step's launch plan (csrc/include/kexue/sign_optim_plan.h), tested without a GPU.

The CUDA step keeps one plan per call structure and uploads the jobs array (addresses,
coefficients, flags) only when its bytes change. Whether a tensor moves as 128-bit accesses is part
of the structure (the items' fourth column, ``vec``). ``kexue._C.sign_optim_plan_probe`` runs that very
host code on CPU tensors, with a cache of its own, and reports the builds, the uploads and the
plan. A spy on ``ops.fused_step`` feeds it every call the optimizer makes on the ``cpu`` backend,
whose table rows are the ones the CUDA step gets (both carry Tiger's sums of squares).
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue import _backend
from kexue import _sign_table as table
from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger

_C = _backend.native()
pytestmark = pytest.mark.skipif(
    _C is None or not hasattr(_C, "sign_optim_plan_probe"), reason="the native module with the plan probe is not built"
)


class Probe:
    """The CUDA plan of every fused call, as ``sign_optim_plan_probe`` sees it."""

    FIELDS = ("builds", "uploads", "plans", "items", "prepass", "steps", "spans", "outs")

    def __init__(self, monkeypatch, capturable=False):
        self.calls: list[dict] = []
        self.flags: list[list[int]] = []
        real = ops.fused_step
        first = [True]

        def spy(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn=None):
            out = _C.sign_optim_plan_probe(
                params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, capturable, first[0]
            )
            first[0] = False
            self.calls.append(dict(zip(self.FIELDS, out, strict=True)))
            self.flags.append(ints[:, table.FLAGS].tolist())
            return real(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn)

        monkeypatch.setattr(ops, "fused_step", spy)

    @property
    def last(self) -> dict:
        return self.calls[-1]


def _params(dtype=torch.float32, seed=0, shapes=((8, 40), (40,), (3, 5))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _run(opt, params, steps, seed=1, before_step=None, fresh_grads=True):
    with kexue.use_backend("cpu"):
        for i in range(steps):
            if fresh_grads or i == 0:
                _grads(params, seed + i)
            if before_step is not None:
                before_step(i)
            opt.step()


def test_same_step_twice_builds_one_plan_and_uploads_once(monkeypatch):
    probe = Probe(monkeypatch)
    params = _params()
    opt = Lion(params, lr=1e-3, weight_decay=0.1)
    _run(opt, params, 3, fresh_grads=False)  # the same gradient tensors: the same addresses
    assert [c["builds"] for c in probe.calls] == [1, 1, 1]
    assert [c["uploads"] for c in probe.calls] == [1, 1, 1]


def test_lr_change_uploads_without_building(monkeypatch):
    probe = Probe(monkeypatch)
    params = _params()
    opt = Lion(params, lr=1e-3)
    _run(opt, params, 3, fresh_grads=False, before_step=lambda i: opt.param_groups[0].__setitem__("lr", 1e-3 / (i + 1)))
    assert [(c["builds"], c["uploads"]) for c in probe.calls] == [(1, 1), (1, 2), (1, 3)]


def test_new_param_dtype_group_or_structural_option_builds(monkeypatch):
    probe = Probe(monkeypatch)
    params = _params()
    opt = Lion(params, lr=1e-3)
    _run(opt, params, 2)
    assert probe.last["builds"] == 1
    extra = _params(torch.bfloat16, seed=5)[:1]  # a new group, a new dtype
    opt.add_param_group({"params": extra, "lr": 2e-3})
    _run(opt, params + extra, 2)
    assert probe.last["builds"] == 2
    opt.param_groups[1]["embedding"] = True  # rows and lazy updates: structural
    _run(opt, params + extra, 1)
    assert probe.last["builds"] == 3
    assert probe.last["plans"] == 3


def test_tiger_builds_twice_then_keeps_its_plan(monkeypatch):
    """The first step reads theta (no RMS_CARRIED), later ones carry: two plans, then none more,
    across lr changes and accumulation micro-steps (UPDATE is read at run time, not planned)."""
    probe = Probe(monkeypatch)
    params = _params()
    opt = Tiger(params, lr=1e-3, grad_accum_steps=2)
    _run(opt, params, 6, before_step=lambda i: opt.param_groups[0].__setitem__("lr", 1e-3 * (i + 1)))
    assert [c["builds"] for c in probe.calls] == [1, 2, 2, 2, 2, 2]
    updates = [bool(f[0] & table.UPDATE) for f in probe.flags]
    assert updates == [False, True] * 3  # both kinds of micro-step share the carried plan


def _covers(items, job, numel, row_len=0):
    """The items of ``job`` tile [0, numel) in order; whole rows when ``row_len``."""
    mine = items[items[:, 0] == job]
    assert mine[0, 1] == 0 and mine[-1, 2] == numel
    assert torch.equal(mine[1:, 1], mine[:-1, 2])
    if row_len:
        assert bool((mine[:, 1:3] % row_len == 0).all())


def _tiger_model():
    g = torch.Generator().manual_seed(2)
    shapes = {"w_big": (70_001,), "w": (33, 40), "emb": (50, 24), "b": (40,)}
    p = {k: torch.randn(*s, generator=g).requires_grad_() for k, s in shapes.items()}
    groups = [
        {"params": [p["w_big"], p["w"]], "kind": "matrix"},
        {"params": [p["emb"]], "embedding": True},
        {"params": [p["b"]], "kind": "bias"},
    ]
    return p, groups


@pytest.mark.parametrize("nan_guard", [None, "tensor"])
def test_carried_step_plans_no_read_of_theta(monkeypatch, nan_guard):
    """Tiger's first step plans a pre-pass over the matrices (their RMS); once the sums are carried
    the pre-pass is planned only for the NaN guard's read of the grads, and without the guard
    there is none. The matrices hand their sums on through the step's partials (outs), the
    embedding table row by row (no outs), the bias not at all."""
    probe = Probe(monkeypatch)
    p, groups = _tiger_model()
    opt = Tiger(groups, lr=1e-2, nan_guard=nan_guard)
    _run(opt, list(p.values()), 2)
    first, second = probe.calls
    n_big = -(-70_001 // 65536)  # two work items
    assert first["prepass"][:, 3].sum() == (n_big + 1 + (2 if nan_guard else 0))
    if nan_guard is None:
        assert second["prepass"].shape[0] == 0
    else:  # every tensor's grads, for the guard; the kernel reads theta only without RMS_CARRIED
        assert second["prepass"][:, 3].sum() == n_big + 3
        assert probe.flags[1][:3] == [f | table.RMS_CARRIED for f in probe.flags[0][:3]]
    for call in (first, second):
        assert call["outs"][:, 0].tolist() == [0, 1]  # the whole-tensor sums only
        assert set(call["spans"][:, 0].tolist()) == ({0, 1} if nan_guard is None else {0, 1, 2, 3})
        items = call["items"]
        steps = items[call["prepass"][:, 3].sum() :]
        for job, (name, row_len) in enumerate([("w_big", 0), ("w", 0), ("emb", 24), ("b", 0)]):
            _covers(steps, job, p[name].numel(), row_len)
        out_items = call["outs"][:, 2].tolist()
        assert out_items == [n_big, 1]  # each output span covers its tensor's step items


@pytest.mark.parametrize("capturable, plans", [(False, 1), (True, 2)])
def test_capturable_plans_are_keyed_by_their_tables(monkeypatch, capturable, plans):
    """Two optimizers of one structure share a plan (their jobs are uploaded in turn), unless
    capturable: a captured graph's tables must never be replaced, so each gets its own."""
    probe = Probe(monkeypatch, capturable=capturable)
    a, b = _params(seed=1), _params(seed=2)
    opt_a, opt_b = Lion(a, lr=1e-3), Lion(b, lr=1e-3)
    _run(opt_a, a, 1)
    _run(opt_b, b, 1)
    assert probe.last["plans"] == plans
    assert probe.last["builds"] == plans
    assert probe.last["uploads"] == 2  # shared: b's jobs replaced a's; else one upload each


def test_least_recently_used_plans_are_dropped(monkeypatch):
    probe = Probe(monkeypatch)
    for n in range(1, 19):  # 18 structures: one tensor of n elements each
        params = _params(shapes=((n,),))
        _run(Lion(params, lr=1e-3), params, 1)
    assert probe.last["builds"] == 18
    assert probe.last["plans"] == 16


def test_carried_sums_in_capturable_rows_are_refused():
    p = torch.zeros(4)
    hyper = torch.zeros(1, table.NUM_FLOATS, dtype=torch.float64)
    ints = torch.zeros(1, table.NUM_INTS, dtype=torch.int64)
    ints[0, table.NAN_GROUP] = -1
    ints[0, table.FLAGS] = table.RMS_TENSOR | table.SSQ_OUT | table.DYNAMIC
    ssq = [torch.zeros(1, dtype=torch.float64)]
    args = ([p], [torch.zeros(4)], [torch.zeros(4)], [None], [torch.empty(0, dtype=torch.uint8)], ssq, hyper, ints)
    with pytest.raises(RuntimeError, match="capturable"):
        _C.sign_optim_plan_probe(*args, True, True)
    ints[0, table.FLAGS] = table.RMS_TENSOR | table.SSQ_OUT
    assert _C.sign_optim_plan_probe(*args, False, True)[0] == 1


# ---------------------------------------------------------------------------------------------
# 128-bit accesses: which tensors the plan marks vectorizable, and a new plan when that changes.


def _at(n, offset=0, dtype=torch.float32, fill=None):
    """``n`` elements of ``dtype`` starting ``offset`` elements into a fresh (aligned) buffer."""
    buf = torch.randn(n + offset).to(dtype) if fill is None else torch.full((n + offset,), fill, dtype=dtype)
    return buf[offset:]


def _raw(params, grads, moms, masks=None, flags=0, row_len=0):
    """The probe's arguments for Lion-like rows over the given tensors (no NaN guard, no sums)."""
    T = len(params)
    hyper = torch.zeros(T, table.NUM_FLOATS, dtype=torch.float64)
    ints = torch.zeros(T, table.NUM_INTS, dtype=torch.int64)
    ints[:, table.NAN_GROUP] = -1
    ints[:, table.FLAGS] = table.UPDATE | flags
    ints[:, table.ROW_LEN] = row_len
    empty = [torch.empty(0, dtype=torch.uint8)] * T
    ssq = [torch.empty(0, dtype=torch.float64)] * T
    return (params, grads, moms, masks or [None] * T, empty, ssq, hyper, ints)


def _vec(out) -> dict[int, set[int]]:
    """The vec column of the step items, by job (one value per job: every item of a job agrees)."""
    _, _, _, items, prepass, _, _, _ = out
    steps = items[int(prepass[:, 3].sum()) :] if prepass.shape[0] else items
    return {int(j): set(steps[steps[:, 0] == j, 3].tolist()) for j in steps[:, 0].unique()}


# (param dtype, momentum dtype, numel, element offsets of param / grad / momentum, vectorizable):
# every array must start on 16 bytes and hold at least one group of 8 elements.
ALIGNMENT_CASES = {
    "f32 aligned": (torch.float32, torch.float32, 64, (0, 0, 0), 1),
    "f32 odd length": (torch.float32, torch.float32, 13, (0, 0, 0), 1),  # the tail group goes scalar
    "f32 shorter than a group": (torch.float32, torch.float32, 7, (0, 0, 0), 0),
    "f32 param at +4 bytes": (torch.float32, torch.float32, 64, (1, 0, 0), 0),
    "f32 grad at +8 bytes (bucket view)": (torch.float32, torch.float32, 64, (0, 2, 0), 0),
    "f32 grad at +16 bytes": (torch.float32, torch.float32, 64, (0, 4, 0), 1),
    "bf16 aligned, f32 momentum": (torch.bfloat16, torch.float32, 40, (0, 0, 0), 1),
    "bf16 at +16 bytes, f32 momentum": (torch.bfloat16, torch.float32, 40, (8, 8, 0), 1),
    "bf16 at +8 bytes": (torch.bfloat16, torch.float32, 40, (4, 0, 0), 0),
    "bf16, f32 momentum at +8 bytes": (torch.bfloat16, torch.float32, 40, (0, 0, 2), 0),
    "f16, bf16 momentum at +2 bytes": (torch.float16, torch.bfloat16, 40, (0, 0, 1), 0),
    "f32, bf16 momentum at +16 bytes": (torch.float32, torch.bfloat16, 40, (0, 0, 8), 1),
}


@pytest.mark.parametrize("case", sorted(ALIGNMENT_CASES))
def test_vectorizable_per_tensor(case):
    """Each tensor's decision is its own: an aligned neighbour stays vectorizable."""
    ps, ms, n, (op, og, om), want = ALIGNMENT_CASES[case]
    params = [_at(n, op, ps), _at(64)]
    grads = [_at(n, og, ps), _at(64)]
    moms = [_at(n, om, ms, fill=0.0), _at(64, fill=0.0)]
    out = _C.sign_optim_plan_probe(*_raw(params, grads, moms), False, True)
    assert _vec(out) == {0: {want}, 1: {1}}


@pytest.mark.parametrize("offset, want", [(0, 1), (8, 1), (4, 0), (1, 0)])
def test_child_tuning_d_mask_alignment(offset, want):
    """A mask is read 8 bytes at a time: it must start on 8 bytes."""
    n = 48
    mask = _at(n, offset, torch.bool, fill=True)
    args = _raw([_at(n)], [_at(n)], [_at(n, fill=0.0)], masks=[mask], flags=table.MASK_D)
    assert _vec(_C.sign_optim_plan_probe(*args, False, True)) == {0: {want}}


@pytest.mark.parametrize("row_len, want", [(24, 1), (8, 1), (20, 0), (3, 0)])
def test_rows_must_be_whole_groups(row_len, want):
    """A tensor updated row by row starts a group at every row: its row length must be a multiple of 8."""
    n = row_len * 6
    args = _raw([_at(n)], [_at(n)], [_at(n, fill=0.0)], flags=table.LAZY_ROWS, row_len=row_len)
    out = _C.sign_optim_plan_probe(*args, False, True)
    assert _vec(out) == {0: {want}}
    _covers(out[3], 0, n, row_len)


def test_alignment_change_builds_a_plan_and_back_finds_it():
    """A gradient that moves to an unaligned address is a new structure (the kernels would otherwise
    issue a misaligned 128-bit access); moving back finds the first plan again, and another aligned
    address only uploads the jobs."""
    n = 70_001  # two work items, a tail group of 1
    p, m = _at(n), _at(n, fill=0.0)
    aligned, shifted = _at(n), _at(n, 1)
    first = _C.sign_optim_plan_probe(*_raw([p], [aligned], [m]), False, True)
    assert first[:3] == (1, 1, 1) and _vec(first) == {0: {1}}
    assert first[3][:, 3].tolist() == [1, 1]  # every item of the job carries the decision
    second = _C.sign_optim_plan_probe(*_raw([p], [shifted], [m]), False, False)
    assert second[:3] == (2, 2, 2) and _vec(second) == {0: {0}}
    third = _C.sign_optim_plan_probe(*_raw([p], [aligned], [m]), False, False)
    assert third[:3] == (2, 2, 2) and _vec(third) == {0: {1}}  # the first plan, its jobs unchanged
    fourth = _C.sign_optim_plan_probe(*_raw([p], [_at(n, 4)], [m]), False, False)  # +16 bytes: aligned
    assert fourth[:3] == (2, 3, 2) and _vec(fourth) == {0: {1}}


def test_optimizer_gradient_in_a_flat_bucket(monkeypatch):
    """Gradients that are views into one flat buffer (as DDP's buckets) are vectorizable only where
    their offset is a multiple of 16 bytes; the optimizer's own state is always aligned."""
    probe = Probe(monkeypatch)
    params = _params(shapes=((5, 7), (41,), (3, 4)))
    bucket = torch.zeros(sum(p.numel() for p in params))
    opt = Lion(params, lr=1e-3)
    with kexue.use_backend("cpu"):
        at = 0
        for p in params:
            p.grad = bucket[at : at + p.numel()].view_as(p).normal_()
            at += p.numel()
        opt.step()
    assert _vec(tuple(probe.last[k] for k in Probe.FIELDS)) == {0: {1}, 1: {0}, 2: {1}}  # at 0, 140, 304 B
