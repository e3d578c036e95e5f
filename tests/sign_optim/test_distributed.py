"""Lion and Tiger under DDP and FSDP2 (gloo, 2 CPU processes) equal single-process training.

Tiger is the demanding case: its whole-tensor RMS and its NaN guard are reductions over a tensor
that FSDP2 splits across ranks (python/kexue/optim/_sharded.py completes them). The run injects a
NaN into one element of one gradient at one step, which under FSDP2 only the rank holding that
element sees, and every rank must still shrink the whole tensor.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch built without distributed/gloo"
)

STEPS = 5
NAN_STEP = 2
BATCH = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(24, 16)
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, tokens):
        return self.fc2(self.norm(torch.relu(self.fc1(self.emb(tokens).mean(1)))))


def _data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (STEPS, BATCH, 5), generator=g)  # tokens 20..23 never appear
    target = torch.randn(STEPS, BATCH, 4, generator=g)
    return tokens, target


def _optimizer(name, model):
    from kexue.optim import Lion, Tiger, embedding_param_groups, tiger_param_groups

    if name == "tiger":
        return Tiger(tiger_param_groups(model), lr=2e-2, weight_decay=0.05, nan_guard="tensor")
    return Lion(embedding_param_groups(model), lr=1e-2, weight_decay=0.1)


def _inject_nan(weight):
    """NaN into element [0, 0] of the gradient, wherever that element lives."""
    from kexue.optim._sharded import DTensor, local

    grad = weight.grad
    if DTensor is not None and isinstance(grad, DTensor):
        if dist.get_rank() == 0:  # Shard(0): rank 0 holds row 0
            local(grad)[0, 0] = float("nan")
    else:
        grad[0, 0] = float("nan")


def _train(model, opt, rank, world, nan_step):
    tokens, target = _data()
    per = BATCH // world
    for t in range(STEPS):
        x, y = tokens[t, rank * per : (rank + 1) * per], target[t, rank * per : (rank + 1) * per]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if t == nan_step:
            _inject_nan(
                dict(model.named_parameters())[
                    "fc1.weight"
                    if world == 1
                    else next(n for n, _ in model.named_parameters() if n.endswith("fc1.weight"))
                ]
            )
        opt.step()


def _full_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("module.", "")] = full.detach().clone()
    return out


def _worker(rank, world, port, mode, opt_name, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Net()
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            opt = _optimizer(opt_name, model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in (model.emb, model.fc1, model.fc2):
                fully_shard(layer)
            wrapped = fully_shard(model)
            opt = _optimizer(opt_name, model)
        _train(wrapped, opt, rank, world, NAN_STEP if opt_name == "tiger" else None)
        state = _full_state(model)
        if rank == 0:
            torch.save(state, out_path)
        # Both ranks finish their collectives before either tears gloo down: without this, a rank
        # leaving early can abort its peer mid-teardown ("terminate called without an active
        # exception", seen once under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(opt_name):
    torch.manual_seed(0)
    model = Net()
    opt = _optimizer(opt_name, model)
    _train(model, opt, 0, 1, NAN_STEP if opt_name == "tiger" else None)
    return _full_state(model)


@pytest.mark.parametrize("mode, opt_name", [("ddp", "lion"), ("fsdp2", "tiger")])
def test_distributed_equals_single_process(mode, opt_name, tmp_path):
    out = tmp_path / "state.pt"
    mp.spawn(_worker, args=(2, _free_port(), mode, opt_name, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    want = _single_process(opt_name)
    assert got.keys() == want.keys()
    for name in want:
        # The gradients differ only by the rounding of the cross-rank average; the sign step
        # amplifies that only where a momentum sits at zero, which random data does not produce.
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    initial = Net()
    # The rows of tokens that never appear stayed where they were (the embedding-drift guard).
    assert torch.equal(got["emb.weight"][20:], initial.emb.weight.detach()[20:])
    assert all(torch.isfinite(v).all() for v in got.values())
