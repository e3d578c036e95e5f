"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), fused."""

from __future__ import annotations

from kexue import _sign_table as table
from kexue.optim._sign_base import SignOptimizer, _Entry


class Lion(SignOptimizer):
    r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    .. math::
        c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        \theta_t = \theta_{t-1} - \eta_t\,(\mathrm{sign}(c_t) + \lambda\theta_{t-1}),\quad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    (``sign(0) = 0``; the momentum is updated after the step, from the old one.)

    Non-finite gradients, the same on every backend: the formulas run in IEEE float arithmetic
    with sign(+-inf) = +-1 and sign(NaN) = NaN. A +-inf gradient moves its element by one lr step
    and leaves an infinite momentum; a NaN (or inf - inf) reaching sign(c) makes that element of
    theta NaN, so divergence shows instead of freezing the element silently (torch.sign(NaN) would
    give 0). An element ChildTuning masks out never sees its gradient. Under
    ``torch.amp.GradScaler`` a step with any non-finite gradient is skipped whole. One fused kernel
    call per device updates every parameter of every group; see :mod:`kexue.optim._sign_base`
    for the options shared with :class:`~kexue.optim.Tiger` (bf16 momentum, the embedding-drift
    guard, ChildTuning-F/-D, stochastic rounding).

    Guidance from the paper (arXiv 2302.06675, kexue.fm/archives/9473): lr 3-10x smaller than AdamW's, weight
    decay 3-10x larger (the effective decay is lr * weight_decay); betas (0.95, 0.98) for language
    models.

    Args:
        params: parameters or param groups (named parameters are accepted, as by torch.optim).
        lr: learning rate (default 1e-4, the official code's).
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.99)).
        weight_decay: decoupled weight decay lambda (default 0).
        seed: seed of ChildTuning-F masks and stochastic rounding (default: drawn from torch's RNG).
        **options: the shared options (``momentum_dtype``, ``embedding``, ``drift_guard``,
            ``freeze_absent_momentum``, ``child_tuning``, ``reserve_p``, ``mask_update``,
            ``child_tuning_rescale``, ``stochastic_rounding``, ``maximize``, ``capturable``).
    """

    _ALGORITHM_KEYS = ("betas",)

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        seed: int | None = None,
        **options,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay}, options, seed)

    def _check_algorithm_group(self, group, gi, real) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise self._group_error(gi, f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not (isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0):
                raise self._group_error(gi, f"betas[{i}] must lie in [0, 1), got {b!r}")

    def _algorithm_row(self, e: _Entry, t: int | None, floats: list[float], ints: list[int]) -> None:
        beta1, beta2 = (float(b) for b in e.group["betas"])
        floats[table.LR] = 1.0  # the lr factor: the group's lr itself
        floats[table.WD] = float(e.group["weight_decay"])
        floats[table.C_M], floats[table.C_G] = beta1, 1.0 - beta1
        floats[table.M_M], floats[table.M_G] = beta2, 1.0 - beta2
        ints[table.FLAGS] |= table.UPDATE

    def _accumulation(self, group: dict) -> tuple[float, int]:
        return float(group["betas"][1]), 1
