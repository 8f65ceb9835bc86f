"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, as_tuple, check_betas, check_lr, check_real, check_torch_flags



class Lion(FusedOptimizer):
    """Lion::

        c = b1 m + (1 - b1) g
        p = p (1 - lr wd) - lr sign(c)
        m = b2 m + (1 - b2) g

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device). Lion moves every
            element by lr, so it wants a smaller one than AdamW (the paper: 3-10x smaller).
        betas: (b1, b2): b1 mixes the gradient into the update's direction, b2 into the stored momentum.
        weight_decay: decoupled weight decay, scaled by the applied lr.
    """

    rule = "lion"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, schedule: Schedule | None = None, backend: str = "auto",
                 state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None, max_grad_norm: float = 0.0, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        check_torch_flags("uba_fused.Lion", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, betas=as_tuple(betas), weight_decay=weight_decay, schedule=schedule, backend=backend,
                        state_dtype=state_dtype, master_weights=master_weights, seed=seed,
                        state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_real("weight_decay", group["weight_decay"])


Lion.__doc__ += COMMON_ARGS
