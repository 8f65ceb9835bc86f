"""AdaBelief: the rule of the official adabelief-pytorch 0.2 (decoupled decay, no rectification)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import FusedOptimizer, as_tuple, check_betas, check_lr, check_real, check_torch_flags


class AdaBelief(FusedOptimizer):
    """AdaBelief (Zhuang et al., NeurIPS 2020), as adabelief-pytorch 0.2 computes it::

        m = b1 m + (1 - b1) g
        s = b2 s + (1 - b2) (g - m)^2 + eps
        p = p (1 - lr wd) - lr / (1 - b1^k) * m / (sqrt(s) / sqrt(1 - b2^k) + eps)

    with k the parameter's step count (1 on its first update).
    """

    rule = "adabelief"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, *, schedule: Schedule | None = None,
                 backend: str = "auto", maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.AdaBelief", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay, schedule=schedule,
                        backend=backend)
        super().__init__(params, defaults)

    def _state_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_var")

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_real("eps", group["eps"])
        check_real("weight_decay", group["weight_decay"])
