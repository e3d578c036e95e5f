"""Optimizers (``torch.optim.Optimizer`` subclasses). Lion and Tiger land with issue 3."""

__all__: list[str] = []
