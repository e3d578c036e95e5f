"""Embedding tables (per-row handling) and ChildTuning-D against the float64 oracle, on every backend."""

from __future__ import annotations

import pytest
import torch

from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import BACKENDS, drive, make_params, random_grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("accum, freeze", [(1, False), (1, True), (3, False)])
def test_embedding_rows_match_oracle(backend, accum, freeze):
    """Row-wise RMS, lazy rows (absent rows), accumulation windows with rows seen earlier."""
    table = make_params([(50, 33)], torch.float32, seed=5)[0]
    other = make_params([(4, 33)], torch.float32, seed=6)[0]
    opt = Tiger(
        [{"params": [table], "embedding": True, "freeze_absent_momentum": freeze}, {"params": [other]}],
        lr=3e-2,
        grad_accum_steps=accum,
        weight_decay=0.2,
    )

    def grads_at(t):
        g = random_grads([table, other], 500 + t)
        rows = torch.Generator().manual_seed(t)
        absent = torch.randperm(50, generator=rows)[:35]  # most rows absent in each micro-step
        g[0][absent] = 0
        return g

    drive(opt, [table, other], 7, grads_at, backend, "tiger")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_embedding_and_child_tuning_d_match_oracle(backend):
    table, dense = make_params([(40, 16), (6, 9)], torch.float32, seed=7)
    opt = Lion(
        [
            {"params": [table], "embedding": True},
            {"params": [dense], "child_tuning": "D", "child_tuning_rescale": True, "reserve_p": 0.5},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    opt.set_child_tuning_masks({dense: torch.rand(6, 9, generator=torch.Generator().manual_seed(0)) < 0.5})

    def grads_at(t):
        g = random_grads([table, dense], 600 + t)
        g[0][t * 5 : (t + 1) * 5 + 20] = 0
        return g

    drive(opt, [table, dense], 4, grads_at, backend, "lion")
