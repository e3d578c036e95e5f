"""The tile candidates of the forward and of the backward's dK/dV and dQ kernels, and their tuner
(triton_kernels/_tile_tuner.py): the choice, its cache, when nothing is timed, and every alternate
tile against the float64 reference.

Timing needs a GPU; here a fake timer stands in for CUDA events, so the tests pin the tuner's
logic (which candidate runs last, what is cached, what is never timed), and the interpreter runs
each alternate tile at shapes that cross its edges."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kexue.triton_kernels import _tile_tuner as tuner  # noqa: E402  (after the skip)
from kexue.triton_kernels import logn_attention as K  # noqa: E402
from kexue.triton_kernels import logn_attention_bwd_tiles, logn_attention_fwd  # noqa: E402
from kexue.triton_kernels.logn_attention_rules import FP32_IEEE, NATIVE, TF32, interpreting  # noqa: E402

from tests.logn_attention.test_triton import _check  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv("KEXUE_AUTOTUNE", raising=False)
    tuner.forget()
    yield
    tuner.forget()


def _fake_timer(times: dict, timed: list):
    """A timer that runs the thunk once and reports the candidate's entry in ``times``."""

    def timer(thunk):
        thunk()
        timed.append(ran[-1])
        return times[ran[-1]]

    ran: list = []
    return timer, ran


def test_the_fastest_runs_last_and_is_kept(monkeypatch):
    monkeypatch.setattr(tuner, "may_time", lambda device: True)
    timed: list = []
    timer, ran = _fake_timer({"a": 3.0, "b": 1.0, "c": 2.0}, timed)
    cpu = torch.device("cpu")
    assert tuner.pick("k", ("a", "b", "c"), ran.append, cpu, timer) == "b"
    assert timed == ["a", "b", "c"] and ran[-1] == "b"  # every one timed, the winner launched last
    ran.clear()
    assert tuner.pick("k", ("a", "b", "c"), ran.append, cpu, timer) == "b"
    assert ran == ["b"] and len(timed) == 3  # no timing on a known key
    assert tuner.chosen() == {"k": 1}
    assert tuner.pick("other", ("a", "c"), ran.append, cpu, timer) == "c"  # keys are independent


def test_a_single_candidate_is_never_timed(monkeypatch):
    monkeypatch.setattr(tuner, "may_time", lambda device: True)
    ran: list = []

    def timer(thunk):
        raise AssertionError("timed a lone candidate")

    assert tuner.pick("k", ("only",), ran.append, torch.device("cpu"), timer) == "only"
    assert ran == ["only"] and tuner.chosen() == {}


def test_no_timing_off_cuda_while_compiling_or_when_disabled(monkeypatch):
    assert not tuner.may_time(torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not tuner.may_time(torch.device("cuda"))
    monkeypatch.undo()
    monkeypatch.setenv("KEXUE_AUTOTUNE", "0")
    assert not tuner.may_time(torch.device("cuda"))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_no_timing_while_syncs_are_reported(monkeypatch, mode):
    # set_sync_debug_mode 1 warns and 2 raises on a synchronising call; timing synchronises
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode)
    assert tuner.may_time(torch.device("cuda")) == (mode == 0)


def test_untimed_calls_use_a_known_choice_unless_disabled(monkeypatch):
    timer, ran = _fake_timer({"a": 2.0, "b": 1.0}, [])
    monkeypatch.setattr(tuner, "may_time", lambda device: True)
    tuner.pick("k", ("a", "b"), ran.append, torch.device("cpu"), timer)
    monkeypatch.setattr(tuner, "may_time", lambda device: False)  # e.g. a later CUDA-graph capture
    ran.clear()
    assert tuner.pick("k", ("a", "b"), ran.append, torch.device("cpu"), timer) == "b" and ran == ["b"]
    monkeypatch.setenv("KEXUE_AUTOTUNE", "0")
    assert tuner.pick("k", ("a", "b"), ran.append, torch.device("cpu"), timer) == "a"
    assert tuner.pick("new", ("a", "b"), ran.append, torch.device("cpu"), timer) == "a"
    assert "new" not in tuner.chosen()  # an untimed call caches nothing


@pytest.mark.parametrize(
    "length,bucket", [(1, 512), (512, 512), (513, 2048), (2048, 2048), (8192, 8192), (8193, 32768), (10**6, 32768)]
)
def test_length_buckets(length, bucket):
    assert tuner.length_bucket(length) == bucket


def test_alternates_only_where_the_default_is_the_table_entry():
    cands = logn_attention_fwd.candidates
    assert len(cands(90, 128, NATIVE)) == 3 and len(cands(86, 64, NATIVE, True)) == 2
    assert len(cands(90, 128, NATIVE, True)) == 1  # d=128 alternates kept a stack with a mask
    assert len(cands(90, 128, TF32)) == 1 and len(cands(86, 96, NATIVE)) == 1  # padded heads: one tile
    for family in (80, 86, 90):
        for d in (16, 32, 64, 96, 128):
            for mask in (False, True):
                c = cands(family, d, NATIVE, mask)
                assert c[0] == logn_attention_fwd.tiles(family, d, NATIVE, mask) and len(set(c)) == len(c)


def _with_alternates() -> list:
    """(family, head dim, masked) for every case with an alternate tile."""
    cases = []
    for family in (80, 86, 90):
        for d in (64, 128):
            for masked in (False, True):
                if len(logn_attention_fwd.candidates(family, d, NATIVE, masked)) > 1:
                    cases.append(pytest.param(family, d, masked, id=f"sm{family}-d{d}-mask{int(masked)}"))
    return cases


def _make_winner(monkeypatch, kernel: str, tile) -> list:
    """Lets every launch be timed, with a fake timer under which ``tile`` wins for ``kernel`` (a
    tuning key's first element, e.g. ``"logn_bwd_dq"``) and every other kernel's default wins.
    Returns the list the launches are recorded in, as (kernel, tile)."""
    monkeypatch.setattr(tuner, "may_time", lambda device: True)
    launched: list = []
    defaults: dict = {}
    real_pick = tuner.pick

    def pick(key, cands, run, device, timer=None):
        defaults[key[0]] = cands[0]
        return real_pick(key, cands, lambda t: (launched.append((key[0], t)), run(t))[1], device, timer)

    def timer(thunk):
        thunk()
        name, t = launched[-1]
        return 0.0 if t == (tile if name == kernel else defaults[name]) else 1.0

    monkeypatch.setattr(tuner, "pick", pick)
    monkeypatch.setattr(tuner, "cuda_time", timer)
    return launched


def _on_family(monkeypatch, device, family) -> None:
    """Runs the tiles of ``family``: under the interpreter by patching the family lookup, on a GPU
    only if it is of that family (skipped otherwise)."""
    if interpreting():
        monkeypatch.setattr(K, "arch_family", lambda device: family)
    elif K.arch_family(device) != family:
        pytest.skip(f"not an sm_{family}-family GPU")


@pytest.mark.parametrize("family,d,masked", _with_alternates())
def test_each_alternate_against_the_reference(triton_device, monkeypatch, family, d, masked):
    """Every alternate tile wins once (by a fake timer) and computes the forward and backward of a
    causal GQA problem whose lengths cross its row and key edges, with and without padding."""
    _on_family(monkeypatch, triton_device, family)
    cands = logn_attention_fwd.candidates(family, d, NATIVE, has_mask=masked)
    for winner in cands[1:]:
        tuner.forget()
        launched = _make_winner(monkeypatch, "logn_fwd", winner)
        _check(triton_device, 1, 2, 1, 70, 131, d, torch.float16, True, mask_p=0.1 if masked else None)
        ran = [t for name, t in launched if name == "logn_fwd"]
        assert ran[-1] == winner and set(ran) == set(cands)


def _bwd_alternates() -> list:
    """(kernel, family, head dim, tile) for every alternate tile of the backward's two kernels.
    Under the interpreter a family whose candidates repeat another's (sm_86 those of sm_80) adds
    nothing that would run differently; a GPU runs the cases of its own family."""
    cases, seen = [], set()
    for kernel in ("dkdv", "dq"):
        for family in (80, 86, 90):
            for d in (64, 128):
                cands = logn_attention_bwd_tiles.candidates(kernel, family, d, NATIVE)
                if interpreting() and (kernel, d, cands) in seen:
                    continue
                seen.add((kernel, d, cands))
                for t in cands[1:]:
                    tile = f"{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}"
                    cases.append(pytest.param(kernel, family, d, t, id=f"{kernel}-sm{family}-d{d}-{tile}"))
    return cases


def test_backward_alternates_only_for_full_16_bit_heads():
    cands = logn_attention_bwd_tiles.candidates
    for kernel in ("dkdv", "dq"):
        for family in (80, 86, 90):
            for d in (16, 32, 48, 64, 80, 96, 128):
                for mode in (NATIVE, TF32, FP32_IEEE):
                    c = cands(kernel, family, d, mode)
                    assert c[0] == getattr(logn_attention_bwd_tiles.tiles(family, d, mode), kernel)
                    assert len(set(c)) == len(c)
                    if mode != NATIVE or d not in (64, 128):
                        assert len(c) == 1, (kernel, family, d, mode)
    assert len(_bwd_alternates()) > 0


@pytest.mark.usefixtures("nan_empty")  # an element a candidate leaves unwritten reads as NaN
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("kernel,family,d,tile", _bwd_alternates())
def test_each_backward_alternate_against_the_reference(triton_device, monkeypatch, kernel, family, d, tile, masked):
    """Every alternate tile of the dK/dV and dQ kernels wins once (by a fake timer, after every
    candidate ran) and computes the backward of a causal GQA problem whose lengths cross its row
    and key edges (130 queries, 131 keys), with and without padding. A second call, which looks the
    choice up and launches the winner alone, returns the same bits: the timing launches left
    nothing in the outputs, and the dK/dV sum is deterministic for a tile."""
    _on_family(monkeypatch, triton_device, family)
    name = f"logn_bwd_{kernel}"
    cands = logn_attention_bwd_tiles.candidates(kernel, family, d, NATIVE)
    launched = _make_winner(monkeypatch, name, tile)
    mask_p = 0.1 if masked else None
    first = _check(triton_device, 1, 2, 1, 130, 131, d, torch.float16, True, mask_p=mask_p)
    ran = [t for n, t in launched if n == name]
    assert ran[-1] == tile and set(ran) == set(cands) and len(ran) == len(cands) + 1
    launched.clear()
    again = _check(triton_device, 1, 2, 1, 130, 131, d, torch.float16, True, mask_p=mask_p)
    assert [t for n, t in launched if n == name] == [tile]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
