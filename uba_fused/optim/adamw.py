"""AdamW: torch.optim.AdamW's semantics (decoupled decay, bias correction from each parameter's step)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import FusedOptimizer, as_tuple, check_betas, check_lr, check_real, check_torch_flags


class AdamW(FusedOptimizer):
    """Drop-in for ``torch.optim.AdamW`` (amsgrad and maximize aside), with an optional device-side schedule.

    The arguments of ``torch.optim.AdamW`` come in its order; ``foreach``, ``capturable`` and
    ``fused=True`` are accepted and change nothing (the step is always one fused, capturable
    update). With ``schedule=None`` the group's ``lr`` (float or tensor) is applied as is, so torch
    LR schedulers keep working; with a schedule, step ``t`` runs at ``lr * schedule.factor(t)``,
    computed on the device.
    """

    rule = "adamw"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 schedule: Schedule | None = None, backend: str = "auto", maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        check_torch_flags("uba_fused.AdamW", amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                          capturable=capturable, differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay, schedule=schedule,
                        backend=backend)
        super().__init__(params, defaults)

    def _state_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _check_hyper(self, group: dict) -> None:
        if group.get("decoupled_weight_decay") is False:  # what a torch.optim.Adam state dict holds
            raise ValueError("decoupled_weight_decay=False is torch.optim.Adam's L2 decay; uba_fused.AdamW decays "
                             "decoupled, as torch.optim.AdamW")
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_real("eps", group["eps"])
        check_real("weight_decay", group["weight_decay"])
