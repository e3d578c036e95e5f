"""The bench run's time budget (bench/_budget.py): shares, deadlines and skips, on a fake clock."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench import run
from bench._budget import DEFAULT_BUDGET_S, Budget, history, least_case_cost_s
from bench._case import Case, Peer, Skipped
from bench._timing import HEADLINE, Plan, Timing, time_peers


class FakeTime:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeClock:
    """A bench Clock whose calls take ``per_call_s`` of fake time each and run nothing."""

    def __init__(self, time_: FakeTime, per_call_s: float) -> None:
        self.time, self.per_call_s = time_, per_call_s

    def per_call(self, fn, calls: int) -> float:
        self.time.advance(self.per_call_s * calls)
        return self.per_call_s


def make_case(name: str, peers: int = 2) -> Case:
    return Case(
        name=name,
        mode="forward",
        bytes=1,
        setup=dict,
        peers=[Peer(f"p{i}", lambda inputs: lambda: None) for i in range(peers)],
        subject="p0",
        headline=True,
    )


def test_families_share_what_is_left_by_weight():
    now = FakeTime()
    budget = Budget(100.0, now=now)
    weights = [1, 3]
    assert budget.family_deadline(weights, 0) == pytest.approx(now.t + 25.0)
    now.advance(40.0)  # the first family overran its 25 s: the second gets what is left, 60 s
    assert budget.family_deadline(weights, 1) == pytest.approx(now.t + 60.0)
    now.advance(70.0)
    assert budget.left() == 0.0 and budget.family_deadline(weights, 1) == now.t


def test_cases_share_their_family_time_within_the_budget():
    now = FakeTime()
    budget = Budget(100.0, now=now)
    family_end = now.t + 30.0
    assert budget.case_deadline(family_end, [2, 1, 3], 0) == pytest.approx(now.t + 10.0)
    now.advance(5.0)  # the first case ended early: the next cases share 25 s by weight 1:3
    assert budget.case_deadline(family_end, [2, 1, 3], 1) == pytest.approx(now.t + 6.25)
    # a family deadline beyond the whole budget is cut to it
    assert budget.case_deadline(now.t + 500.0, [1], 0) == pytest.approx(now.t + 95.0)


def test_a_case_that_would_overrun_is_skipped_with_the_reason():
    now = FakeTime()
    budget = Budget(10.0, now=now)
    case = make_case("big", peers=5)
    # the subject and its quickest peer (the others are left out one by one when time is short)
    need = least_case_cost_s(case, HEADLINE)
    assert need == pytest.approx(2 * (HEADLINE.warmup_s + HEADLINE.min_runs * HEADLINE.run_s))
    assert budget.check("fam", case, HEADLINE) is None  # 2.2 s of 10 s
    now.advance(10.0 - need + 0.1)
    skipped = budget.check("fam", case, HEADLINE)
    assert skipped is not None and skipped.status == "skipped"
    assert "10 s budget" in str(skipped) and "needs at least 2 s (p0 and its quickest peer" in str(skipped)
    assert budget.skipped == [f"fam: big forward ({skipped})"]


def write_record(path, rows, quick=False):
    path.write_text(json.dumps({"quick": quick, "rows": rows}))


def timed_row(peer, median_s, first_call_s, case="big"):
    return {
        "family": "fam",
        "case": case,
        "mode": "forward",
        "peer": peer,
        "median_s": median_s,
        "first_call_s": first_call_s,
    }


def test_earlier_runs_tell_what_a_case_costs(tmp_path):
    write_record(tmp_path / "bench-20260101-000000.json", [timed_row("p0", 9.0, 9.0), timed_row("p1", 9.0, 9.0)])
    # the newest record wins; a --quick record (its shapes are small) is not read
    write_record(tmp_path / "bench-20260102-000000.json", [timed_row("p0", 2.0, 30.0)])
    write_record(tmp_path / "bench-20260103-000000.json", [timed_row("p0", 1e-3, 1e-3)], quick=True)
    (tmp_path / "bench-20260104-000000.json").write_text("{not json")
    known = history(tmp_path)
    assert known[("fam", "big", "forward", "p0")]["median_s"] == 2.0
    case = make_case("big", peers=3)
    plan = HEADLINE
    # p0 (the subject): first call 30 s, one warm-up call of 2 s, 3 samples of one 2 s call;
    # p1: 9 + 9 + 27; p2 (never timed, the quickest): warm-up and 3 samples of run_s
    expected = (30 + 2 + 3 * 2) + (plan.warmup_s + 3 * plan.run_s)
    assert least_case_cost_s(case, plan, "fam", known) == pytest.approx(expected)
    now = FakeTime()
    budget = Budget(30.0, now=now, known=known)
    skipped = budget.check("fam", case, plan)
    assert skipped is not None and "2 peers from earlier runs" in str(skipped)
    assert Budget(30.0, now=now).check("fam", case, plan) is None  # without history it looks cheap


def test_budget_must_be_positive():
    for bad in (0, -1.0, float("nan"), True, "60"):
        with pytest.raises(ValueError, match="budget"):
            Budget(bad)


@pytest.mark.parametrize(("deadline_in", "runs"), [(None, 9), (3.0, 6), (1.5, 3)])
def test_sampling_shrinks_to_meet_the_deadline(deadline_in, runs):
    now = FakeTime()
    clock = FakeClock(now, per_call_s=0.0625)  # 4 calls a 0.25 s sample (binary fractions: exact sums)
    plan = Plan(warmup_s=0.5, run_s=0.2, min_runs=3, max_runs=9, budget_s=3.0)
    fns = {"a": lambda: None, "b": lambda: None}

    def deadline_after_warmup():
        # the deadline is read after the warm-ups, which take 2 x (first call + 0.5 s) of fake time
        return None if deadline_in is None else now.t + 2 * (0.0625 + 0.5) + deadline_in

    result = time_peers(fns, clock, plan, deadline=deadline_after_warmup(), now=now)
    for timing in result.values():
        assert isinstance(timing, Timing)
        # 2 peers: each may sample for half the time left, 0.25 s a sample; never fewer than 3
        assert len(timing.samples) == runs and timing.calls_per_run == 4


def test_run_family_skips_what_no_longer_fits(monkeypatch, capsys):
    now = FakeTime()
    budget = Budget(10.0, now=now)
    deadlines = []

    def fake_measure(case, device, clock, plan, deadline=None, expected_s=None):
        deadlines.append(deadline - now.t)
        now.advance(4.0)  # each case takes 4 s whatever its deadline (first calls are not bounded)
        timing = Timing([1e-3] * plan.min_runs, 1, 1e-3)
        return {p.name: timing for p in case.peers}, {}

    monkeypatch.setattr(run, "measure_case", fake_measure)
    cases = [make_case("one"), make_case("two"), make_case("three")]
    family = (SimpleNamespace(HEADLINES=[]), cases)
    rows, _ = run.run_family(
        "fam", "cpu", None, HEADLINE, False, {"gbps": 1.0}, {}, budget=budget, deadline=now.t + 9.0, planned=family
    )
    # equal weights: the first case may take a third of 9 s, the second half of the 5 s then left
    assert deadlines == pytest.approx([3.0, 2.5])
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "skipped", "skipped"]
    assert "2 s left" in rows[-1]["reason"]
    assert "three forward ... skipped: over the run's 10 s budget" in capsys.readouterr().err


def test_main_reports_budget_skips_and_wall_time(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = ["--quick", "--only", "entropy_norm", "--out", str(tmp_path), "--device", "cpu", "--threads", "1"]
    assert run.main([*args, "--budget", "0.01"]) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("bench-*.json")
    record = json.loads(json_path.read_text())
    assert record["budget"]["total_s"] == 0.01 and record["budget"]["skipped"]
    assert {r["status"] for r in record["rows"]} == {"skipped"}
    assert "budget; " in out and "case(s) skipped to stay within it" in out and "wall time" in out


def test_default_plan_has_the_default_budget(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_budget(total_s, known=None):
        seen["total_s"] = total_s
        raise Stop

    monkeypatch.setattr(run, "Budget", fake_budget)
    with pytest.raises(Stop):
        run.main(["--device", "cpu"])
    assert seen["total_s"] == DEFAULT_BUDGET_S <= 8 * 60 - 60  # a minute left for start-up and plots
    with pytest.raises(SystemExit):
        run.parse_args(["--budget", "0"])


def test_peers_whose_turn_comes_after_the_deadline_are_left_out():
    now = FakeTime()
    clock = FakeClock(now, per_call_s=0.0625)
    plan = Plan(warmup_s=0.5, run_s=0.25, min_runs=3, max_runs=9, budget_s=3.0)
    fns = {"slow": lambda: None, "kexue": lambda: None, "late": lambda: None}
    # each warm-up takes 0.5625 s of fake time: "slow" fits (1.25 s of warm-up and samples after its
    # first call), "late" no longer does when its turn comes, "kexue" is kept
    result = time_peers(fns, clock, plan, deadline=now.t + 1.5, now=now, keep="kexue")
    assert isinstance(result["slow"], Timing) and isinstance(result["kexue"], Timing)
    assert result["late"].status == "skipped" and "time budget" in str(result["late"])
    assert len(result["kexue"].samples) == plan.min_runs
    # before the deadline, a peer that earlier runs say would not end in time is left out too
    now.t = 0.0
    result = time_peers(fns, clock, plan, deadline=5.0, now=now, keep="kexue", expected_s={"slow": 6.0, "kexue": 9})
    assert "earlier runs say" in str(result["slow"]) and "6 s" in str(result["slow"])
    assert isinstance(result["kexue"], Timing) and isinstance(result["late"], Timing)


class PerPeerClock(FakeClock):
    """Calls of ``fn`` take ``seconds[fn]`` of fake time each."""

    def __init__(self, time_, seconds):
        super().__init__(time_, 0.0)
        self.seconds = seconds

    def per_call(self, fn, calls):
        self.time.advance(self.seconds[fn] * calls)
        return self.seconds[fn]


def test_a_peer_whose_first_call_shows_it_cannot_finish_is_left_out():
    now = FakeTime()
    plan = Plan(warmup_s=0.5, run_s=0.25, min_runs=3, max_runs=9, budget_s=3.0)
    kexue, slow, quick = (lambda: 1), (lambda: 2), (lambda: 3)
    clock = PerPeerClock(now, {kexue: 2.0, slow: 2.0, quick: 0.0625})
    fns = {"slow": slow, "kexue": kexue, "quick": quick}
    # 10 s: "slow" needs 2 + (2 + 3 x 2) s; after its first call 8 s are left: it just fits
    result = time_peers(fns, clock, plan, deadline=now.t + 10.0, now=now, keep="kexue")
    assert isinstance(result["slow"], Timing)
    now.t = 0.0
    result = time_peers(fns, clock, plan, deadline=7.0, now=now, keep="kexue")
    assert result["slow"].status == "skipped" and "after its first call (2 s)" in str(result["slow"])
    assert "about 8 s, more than the 5 s" in str(result["slow"])
    assert isinstance(result["kexue"], Timing)  # the subject as slow, but kept
    assert isinstance(result["quick"], Timing) or result["quick"].status == "skipped"


def test_measure_case_leaves_out_peers_built_after_the_deadline():
    from bench._measure import measure_case

    now = FakeTime()
    built = []

    def build(name, seconds):
        def make(inputs):
            built.append(name)
            now.advance(seconds)  # building may compile
            return lambda: None

        return make

    peers = [
        Peer("compiled", build("compiled", 5.0)),
        Peer("kexue", build("kexue", 0.0)),
        Peer("other", build("other", 0)),
    ]
    case = Case("c", "forward", 1, dict, peers, subject="kexue")
    results, _ = measure_case(case, __import__("torch").device("cpu"), FakeClock(now, 0.0625), HEADLINE, now.t + 1, now)
    assert built == ["compiled", "kexue"]  # the subject is built and timed however late
    assert results["other"].status == "skipped"
    assert isinstance(results["kexue"], Timing) and isinstance(results["compiled"], Skipped)
