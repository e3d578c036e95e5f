"""The README's "Swapping AdamW for Lion or Tiger": its block runs, trains, and every claim of the section holds.

The block is taken from README.md and executed with a ``model`` of the test's choosing (as
tests/test_readme.py does with its own), so the README and these checks cannot drift apart.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kexue
from kexue.optim import Lion, Tiger

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### Swapping AdamW for Lion or Tiger"


def readme_block() -> str:
    text = README.read_text()
    found = re.search(re.escape(HEADING) + r"\n\n```python\n(.*?)```", text, flags=re.S)
    assert found, f"README.md has no python block right under {HEADING!r}"
    return found.group(1)


def swap(model: nn.Module) -> dict:
    """Run the README's block on ``model``; returns its namespace (adamw, lion, tiger, lr, wd, r, ...)."""
    namespace = {"model": model}
    exec(compile(readme_block(), "README.md swap block", "exec"), namespace)
    return namespace


class Bag(nn.Module):
    """A bag-of-tokens classifier: embedding, linear, norm, linear (every Tiger tensor kind)."""

    def __init__(self, vocab: int = 50, d: int = 32, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.l1 = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(2 * d)
        self.l2 = nn.Linear(2 * d, classes)

    def forward(self, ids):
        return self.l2(self.norm(torch.relu(self.l1(self.emb(ids).mean(1)))))


def fixed_problem():
    """256 bags of 8 token ids; 4 classes from a random teacher's score of the bag and of its first token."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (256, 8), generator=g)
    teacher = torch.randn(50, generator=g)
    y = (teacher[ids].mean(-1) > 0).long() + 2 * (teacher[ids[:, 0]] > 0).long()
    return ids, y


@pytest.fixture
def one_thread():
    # a tiny model trains ~50x faster on one thread than on two contended ones
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded_bag() -> Bag:
    torch.manual_seed(0)
    return Bag()


# ------------------------------------------------------------------------------ (a) it trains


@pytest.mark.parametrize("name", ["adamw", "lion", "tiger"])
def test_readme_swap_trains(name, one_thread):
    ids, y = fixed_problem()
    model = seeded_bag()
    namespace = swap(model)
    opt = namespace[name]
    # the README's warm-up schedule, on a 400-step run
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))
    losses = []
    for _ in range(400):
        loss = F.cross_entropy(model(ids), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    # seen: adamw 1.54 -> 0.01, lion 1.54 -> 0.10, tiger 1.54 -> 0.45 (Tiger's relative lr is the slowest here)
    assert last < 0.4 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    assert all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------- (b) the effective decay


def test_readme_conversion_hyperparameters():
    ns = swap(seeded_bag())
    adamw, lion, r = ns["adamw"], ns["lion"], ns["r"]
    assert 3 <= r <= 10
    assert len(adamw.param_groups) == len(lion.param_groups) == 2
    for ga, gl in zip(adamw.param_groups, lion.param_groups, strict=True):
        lion_lr = gl["initial_lr"]  # the block's LambdaLR already scaled "lr" by the warm-up
        assert math.isclose(lion_lr * r, ga["lr"], rel_tol=1e-12)
        assert math.isclose(lion_lr * gl["weight_decay"], ga["lr"] * ga["weight_decay"], rel_tol=1e-12)
    assert adamw.param_groups[0]["weight_decay"] == ns["wd"] > 0
    assert lion.param_groups[1]["weight_decay"] == adamw.param_groups[1]["weight_decay"] == 0.0
    assert tuple(lion.param_groups[0]["betas"]) == (0.95, 0.98)  # the language-model betas
    tiger = ns["tiger"].param_groups
    assert {g["kind"] for g in tiger} == {"embedding", "matrix", "bias", "gamma"}
    assert all(g["lr"] == 1e-3 and g["beta"] == 0.965 and g["weight_decay"] == 0.01 for g in tiger)


def test_readme_conversion_keeps_the_effective_decay(one_thread):
    # With zero gradients both optimizers only decay: AdamW multiplies by 1 - lr*wd, and so does Lion
    # (sign(0) = 0). Under the README's schedule the two runs must stay equal step for step.
    model_a = seeded_bag()
    model_l = copy.deepcopy(model_a)
    ns_a, ns_l = swap(model_a), swap(model_l)
    adamw, lion, schedule = ns_a["adamw"], ns_l["lion"], ns_a["schedule"]
    scheds = [torch.optim.lr_scheduler.LambdaLR(adamw, schedule), ns_l["sched"]]
    start = [p.detach().clone() for p in model_a.parameters()]
    shrink = 1.0
    for _ in range(30):
        shrink *= 1 - adamw.param_groups[0]["lr"] * adamw.param_groups[0]["weight_decay"]
        for model, opt, sched in ((model_a, adamw, scheds[0]), (model_l, lion, scheds[1])):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            sched.step()
        for pa, pl in zip(model_a.parameters(), model_l.parameters(), strict=True):
            torch.testing.assert_close(pl, pa, rtol=1e-6, atol=0)
    assert shrink < 1 - 1e-5  # the decay did act
    for p, p0 in zip(model_a.parameters(), start, strict=True):
        expected = p0 * shrink if p.dim() >= 2 else p0  # the second group has weight_decay 0
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------- (c) groups and schedulers


def test_param_groups_carry_over():
    model = seeded_bag()
    ns = swap(model)
    for ga, gl in zip(ns["adamw"].param_groups, ns["lion"].param_groups, strict=True):
        assert [id(p) for p in ga["params"]] == [id(p) for p in gl["params"]]
    assert sum(len(g["params"]) for g in ns["lion"].param_groups) == len(list(model.parameters()))


def test_reusing_adamw_group_dicts_would_keep_adamw_lr():
    # why the README builds the list again: torch.optim writes its defaults into the given dicts
    model = seeded_bag()
    groups = [{"params": list(model.parameters())}]
    torch.optim.AdamW(groups, lr=1e-3)
    assert Lion(groups, lr=1e-3 / 3).param_groups[0]["lr"] == 1e-3


def _lion_and_adamw(r: float):
    model = seeded_bag()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    lion = Lion(model.parameters(), lr=1e-3 / r, weight_decay=0.01 * r)
    return adamw, lion


SCHEDULERS = {
    "lambda": lambda opt, scale: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10) * 0.99**t),
    "cosine": lambda opt, scale: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=1e-5 * scale),
    "onecycle": lambda opt, scale: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2 * scale, total_steps=60),
}


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_schedulers_carry_over_with_rates_divided(kind):
    """The README's rule: a LambdaLR as is, absolute rates (eta_min, max_lr) divided by r; then
    Lion's rate is AdamW's / r at every step (warm-up, peak and final alike)."""
    r = 4.0
    adamw, lion = _lion_and_adamw(r)
    scale = 1.0 if kind == "lambda" else 1.0 / r
    sa, sl = SCHEDULERS[kind](adamw, 1.0), SCHEDULERS[kind](lion, scale)
    seen = set()
    for _ in range(50):
        for opt, sched in ((adamw, sa), (lion, sl)):
            opt.step()  # no gradients: nothing moves, the schedulers only see a step was taken
            sched.step()
        la, ll = adamw.param_groups[0]["lr"], lion.param_groups[0]["lr"]
        assert math.isclose(ll * r, la, rel_tol=1e-9), (kind, la, ll)
        seen.add(round(la, 12))
        if kind == "onecycle":  # OneCycleLR cycles betas[0] of both alike
            assert lion.param_groups[0]["betas"][0] == adamw.param_groups[0]["betas"][0]
    assert len(seen) > 10  # the rate did move


def test_tiger_needs_cycle_momentum_false_with_onecycle():
    model = seeded_bag()
    tiger = swap(model)["tiger"]
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(tiger, max_lr=2e-3, total_steps=10)
    sched = torch.optim.lr_scheduler.OneCycleLR(tiger, max_lr=2e-3, total_steps=10, cycle_momentum=False)
    rates = []
    for _ in range(9):
        tiger.step()
        sched.step()
        rates.append(tiger.param_groups[0]["lr"])
    assert max(rates) == pytest.approx(2e-3, rel=1e-9) and all(g["beta"] == 0.965 for g in tiger.param_groups)


# ------------------------------------------------------------------------------ Tiger claims


def test_tiger_step_is_lr_times_rms_after_bert_init():
    """README: after BERT's init (RMS ~0.02) Tiger with lr 1e-3 steps each weight by ~2e-5, biases by 0.5 lr."""
    layer = kexue.init.bert_(nn.Linear(256, 256), generator=torch.Generator().manual_seed(0))
    layer.bias.data.normal_(0, 0.1)
    tiger = Tiger(kexue.optim.tiger_param_groups(layer), lr=1e-3, weight_decay=0.0)
    before = [p.detach().clone() for p in (layer.weight, layer.bias)]
    rms = float(before[0].double().pow(2).mean().sqrt())
    assert abs(rms - 0.02) < 2e-4
    g = torch.Generator().manual_seed(1)
    layer.weight.grad = torch.randn(256, 256, generator=g)
    layer.bias.grad = torch.randn(256, generator=g)
    tiger.step()
    dw, db = (p.detach() - b for p, b in zip((layer.weight, layer.bias), before, strict=True))
    torch.testing.assert_close(dw.abs(), torch.full_like(dw, 1e-3 * rms), rtol=1e-3, atol=0)
    torch.testing.assert_close(db.abs(), torch.full_like(db, 0.5e-3), rtol=1e-3, atol=0)


def test_tiger_without_rms_scale_is_lion_with_equal_betas():
    """README: rms_scale=False makes Tiger's rate absolute, so the Lion conversion applies to it."""
    beta, lr, wd = 0.965, 1e-3 / 3, 0.03
    model_l = seeded_bag()
    model_t = copy.deepcopy(model_l)
    lion = Lion(model_l.parameters(), lr=lr, betas=(beta, beta), weight_decay=wd)
    tiger = Tiger(
        model_t.parameters(), lr=lr, beta=beta, weight_decay=wd, kind="matrix", rms_scale=False, nan_guard=None
    )
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        for p_l, p_t in zip(model_l.parameters(), model_t.parameters(), strict=True):
            p_l.grad = torch.randn(p_l.shape, generator=g)
            p_t.grad = p_l.grad.clone()
        lion.step()
        tiger.step()
    for p_l, p_t in zip(model_l.parameters(), model_t.parameters(), strict=True):
        torch.testing.assert_close(p_t, p_l, rtol=1e-6, atol=1e-9)
    assert not torch.equal(model_l.emb.weight, seeded_bag().emb.weight)
