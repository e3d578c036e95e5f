"""Tiger (Su 2023, kexue.fm/archives/9512, bojone/tiger): Lion with one beta, fused."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from kexue import _sign_table as table
from kexue.optim._sharded import shard_groups
from kexue.optim._sign_base import NAN_OWN, NAN_SHARED, SignOptimizer, _Entry
from kexue.optim.embedding_guard import find_embedding_weights

KINDS = ("auto",) + table.TIGER_KINDS
NAN_GUARDS = (None, "tensor", "global")


class Tiger(SignOptimizer):
    r"""Tiger: sign of a single momentum, learning rate relative to the parameter's RMS.

    With t the 0-based micro-step of a parameter and k = ``grad_accum_steps``:

    .. math::
        m_t = b_1 m_{t-1} + \tfrac{1-\beta}{k} g_t,\quad b_1 = \beta \text{ if } k \mid t \text{ else } 1;
        \qquad \theta_t = \theta_{t-1} - \eta_t\,[\mathrm{sign}(m_t) + \lambda\theta_{t-1}]
        \text{ only when } k \mid t+1

    so ``step()`` may be called on every micro-batch with no extra buffer: after a window the
    momentum holds beta m + (1 - beta) mean(g) and theta moved once. The learning rate is the
    relative rate ``lr`` (alpha, LR schedulers act on it) times a factor per tensor kind:

    - ``"matrix"``: RMS(theta) over the tensor (the kernel that writes theta sums its squares for
      the next step, so the step reads each parameter once, as Lion does: see
      kexue/optim/_carried_rms.py for when that sum is trusted and :meth:`forget_carried_rms`);
    - ``"embedding"``: RMS(theta) of each row (token vector);
    - ``"bias"`` / ``"gamma"`` (biases, norm shifts / norm gains): ``elementwise_lr`` (0.5) and no
      weight decay.

    ``kind="auto"`` (default) picks "embedding" in groups marked ``embedding=True``, "matrix" for
    tensors of 2+ dims, and for the others "gamma" when the parameter's name (named parameters)
    ends in "weight" or contains "gamma", else "bias". :func:`tiger_param_groups` builds groups
    from a model's modules instead. ``rms_scale=c`` (a float) replaces RMS(theta) by c, e.g.
    1/sqrt(hidden), saving the extra read of the params.

    NaN guard (``nan_guard="tensor"``, the reference code's choice; ``"global"`` per the post;
    None: off): a tensor whose gradient holds a NaN or a +-inf keeps its momentum and has theta
    pulled towards its centre, theta <- (theta - c) * ``shrink_ratio`` + c, c = 1 for "gamma",
    else 0. Without the guard, non-finite gradients follow Lion's rule (:class:`~kexue.optim.Lion`):
    IEEE arithmetic with sign(NaN) = NaN, so a NaN that reaches sign(m) shows in theta.

    Options shared with Lion (bf16 momentum, the embedding-drift guard, ChildTuning-F/-D,
    stochastic rounding, maximize): see :mod:`kexue.optim._sign_base`. The drift guard under
    gradient accumulation moves a row on the update micro-step if it had a gradient in any
    micro-step of the window (a per-row flag in the state); ``freeze_absent_momentum`` is not
    available with accumulation.

    Defaults are the reference code's: lr 1e-3 (Su uses a peak of 1e-3..2e-3), beta 0.965 (NLP;
    0.945 for vision), weight_decay 0.01, shrink_ratio 0.99. For its piecewise-linear ``lr_schedule``
    use ``torch.optim.lr_scheduler.LambdaLR(opt, piecewise_linear({...}))``.

    ``capturable=True`` (see :mod:`kexue.optim._sign_base`) covers everything above: the
    accumulation rule's momentum coefficient and update switch are computed on the device from
    the step tensor, and a schedule may be applied there too (:func:`piecewise_linear` takes a
    step tensor), or on the host by a scheduler writing a tensor ``lr`` in place. Sharded DTensor
    parameters whose RMS or NaN guard spans ranks are rejected in this mode.
    """

    _ALGORITHM_KEYS = ("beta", "grad_accum_steps", "kind", "nan_guard")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta: float = 0.965,
        weight_decay: float = 0.01,
        *,
        grad_accum_steps: int = 1,
        kind: str = "auto",
        elementwise_lr: float = 0.5,
        rms_scale: bool | float = True,
        nan_guard: str | None = "tensor",
        shrink_ratio: float = 0.99,
        seed: int | None = None,
        **options,
    ):
        defaults = {
            "lr": lr,
            "beta": beta,
            "weight_decay": weight_decay,
            "grad_accum_steps": grad_accum_steps,
            "kind": kind,
            "elementwise_lr": elementwise_lr,
            "rms_scale": rms_scale,
            "nan_guard": nan_guard,
            "shrink_ratio": shrink_ratio,
        }
        super().__init__(params, defaults, options, seed)

    def _check_algorithm_group(self, group, gi, real) -> None:
        real("beta", 0.0, 1.0, high_open=True)
        k = group["grad_accum_steps"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise self._group_error(gi, f"grad_accum_steps must be an int >= 1, got {k!r}")
        if group["kind"] not in KINDS:
            raise self._group_error(gi, f"kind must be one of {KINDS}, got {group['kind']!r}")
        real("elementwise_lr", 0.0)
        rms = group["rms_scale"]
        if not (isinstance(rms, bool) or (isinstance(rms, (int, float)) and math.isfinite(rms) and rms > 0)):
            raise self._group_error(gi, f"rms_scale must be True, False or a positive float, got {rms!r}")
        if group["nan_guard"] not in NAN_GUARDS:
            raise self._group_error(gi, f"nan_guard must be one of {NAN_GUARDS}, got {group['nan_guard']!r}")
        real("shrink_ratio", 0.0, 1.0, low_open=True)
        if k > 1 and group["freeze_absent_momentum"]:
            raise self._group_error(
                gi,
                "freeze_absent_momentum cannot be combined with grad_accum_steps > 1 "
                "(an absent row would skip the decay of its window)",
            )

    def _kind(self, group: dict, pi: int, p) -> str:
        kind = group["kind"]
        if kind != "auto":
            return kind
        if group["embedding"]:
            return "embedding"
        if p.dim() >= 2:
            return "matrix"
        names = group.get("param_names")
        name = names[pi].lower() if names is not None else ""
        return "gamma" if name.endswith("weight") or "gamma" in name else "bias"

    def _check_algorithm_param(self, where: str, group: dict, pi: int, p) -> None:
        kind = self._kind(group, pi, p)
        if kind == "embedding" and p.dim() < 2:
            raise ValueError(
                f"{where()}: kind 'embedding' needs a table of rows (at least 2 dims), got shape {tuple(p.shape)}"
            )
        reduces = group["nan_guard"] is not None or (kind == "matrix" and group["rms_scale"] is True)
        if group["capturable"] and reduces and shard_groups(p) is not None:
            raise ValueError(
                f"{where()}: capturable=True cannot serve a sharded DTensor parameter whose "
                f"whole-tensor RMS or NaN guard is completed across ranks (that reads the "
                f"reductions on the host); use rms_scale=<float> and nan_guard=None, or "
                f"capturable=False"
            )

    def _accumulation(self, group: dict) -> tuple[float, int]:
        return float(group["beta"]), group["grad_accum_steps"]

    def _needs_row_seen(self, group: dict) -> bool:
        return group["grad_accum_steps"] > 1

    def _algorithm_row(self, e: _Entry, t: int | None, floats: list[float], ints: list[int]) -> None:
        group = e.group
        kind = self._kind(group, e.param_index, e.param)
        k, beta = group["grad_accum_steps"], float(group["beta"])
        # Capturable (t None): "may update"; the momentum coefficient and the update switch of
        # this step come from the dynamic table (_accumulation).
        floats[table.M_M] = beta if t is None or t % k == 0 else 1.0
        floats[table.M_G] = (1.0 - beta) / k
        flags = table.USE_NEW_MOMENTUM
        if t is None or (t + 1) % k == 0:
            flags |= table.UPDATE
        # The factor of alpha (the group's lr) in this tensor's learning rate.
        if kind in ("bias", "gamma"):
            factor, wd = float(group["elementwise_lr"]), 0.0
        else:
            factor, wd = 1.0, float(group["weight_decay"])
            rms = group["rms_scale"]
            if rms is True:
                flags |= table.RMS_ROW if kind == "embedding" else table.RMS_TENSOR
            elif rms is not False:
                factor = float(rms)
        if kind == "embedding":
            ints[table.ROW_LEN] = e.param.shape[-1]
        floats[table.LR], floats[table.WD] = factor, wd
        if group["nan_guard"] is not None:
            ints[table.NAN_GROUP] = NAN_OWN if group["nan_guard"] == "tensor" else NAN_SHARED
            floats[table.SHRINK] = float(group["shrink_ratio"])
            floats[table.CENTRE] = 1.0 if kind == "gamma" else 0.0
        ints[table.FLAGS] |= flags


def piecewise_linear(schedule: Mapping[int, float]) -> Callable[[int | Tensor], float | Tensor]:
    """The reference code's ``lr_schedule`` as a multiplier for ``LambdaLR``.

    ``{step: multiplier}`` points joined linearly; a point (0, 0.0) is prepended when the first
    key is not 0 (linear warm-up from 0); constant after the last key. Steps count micro-steps,
    as ``Tiger.step()`` calls.

    The multiplier also takes a step held in a tensor (e.g. a capturable optimizer's
    ``state['step']``) and then returns a float64 tensor on its device, computed by torch ops with
    no host synchronisation and equal to the float one -- for a schedule inside a captured CUDA
    graph: ``group['lr'].copy_(peak * multiplier(opt.state[p]['step']))``.
    """
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    if not points:
        raise ValueError("schedule must have at least one point")
    if points[0][0] != 0:
        points.insert(0, (0, 0.0))
    xs = [x for x, _ in points]
    on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def device_multiplier(step: Tensor) -> Tensor:
        if step.device not in on_device:  # copied once per device
            table = torch.tensor(points, dtype=torch.float64).to(step.device)
            on_device[step.device] = table[:, 0].contiguous(), table[:, 1].contiguous()
        x, y = on_device[step.device]
        t = step.to(torch.float64)
        if len(points) == 1:
            return y[0].expand_as(t).clone()
        i = (torch.searchsorted(x, t, right=True) - 1).clamp(0, len(points) - 2)
        x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
        return torch.where(t >= x[-1], y[-1], y0 + (y1 - y0) * (t - x0) / (x1 - x0))

    def multiplier(step: int | Tensor) -> float | Tensor:
        if isinstance(step, Tensor):
            return device_multiplier(step)
        i = bisect.bisect_right(xs, step) - 1
        if i >= len(points) - 1:
            return points[-1][1]
        (x0, y0), (x1, y1) = points[i], points[i + 1]
        return y0 + (y1 - y0) * (step - x0) / (x1 - x0)

    return multiplier


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def tiger_param_groups(model: nn.Module, **options) -> list[dict]:
    """Param groups for :class:`Tiger` from a model's modules, with each tensor's kind set.

    Embedding weights (``nn.Embedding``/``nn.EmbeddingBag``) -> "embedding" (with the drift guard
    on); weights of normalization layers -> "gamma"; biases -> "bias"; other tensors of 2+ dims ->
    "matrix", other 1-d/0-d tensors -> "gamma" if named like a weight/gain, else "bias".
    ``options`` are added to every group. Parameters that do not require grad are left out.
    """
    kinds: dict[int, str] = {id(p): "embedding" for p in find_embedding_weights(model)}
    for module in model.modules():
        if isinstance(module, _NORMS):
            for name, p in module.named_parameters(recurse=False):
                kinds.setdefault(id(p), "gamma" if name == "weight" else "bias")
    groups: dict[str, list] = {kind: [] for kind in table.TIGER_KINDS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = kinds.get(id(p))
        if kind is None:
            leaf = name.rsplit(".", 1)[-1].lower()
            if p.dim() >= 2:
                kind = "matrix"
            else:
                kind = "gamma" if leaf == "weight" or "gamma" in leaf or "scale" in leaf else "bias"
        groups[kind].append((name, p))
    return [
        {"params": named, "kind": kind, "embedding": kind == "embedding", **options}
        for kind, named in groups.items()
        if named
    ]
