"""The README's Python examples run as written (given a small model and a loss for the optimizer one)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    loss = model(torch.randint(0, 50, (8,))).pow(2).mean()
    return {"model": model, "loss": loss}


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GradScaler() without CUDA disables itself, and says so
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), _namespace())
