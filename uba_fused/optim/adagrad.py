"""Adagrad (Duchi, Hazan and Singer, 2011): torch.optim.Adagrad's semantics, the optimizer of AdAdaGrad."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, check_lr, check_real, check_torch_flags


class Adagrad(FusedOptimizer):
    """Drop-in for ``torch.optim.Adagrad`` (maximize and sparse gradients aside), its arguments in its order and with
    its defaults::

        g = g + wd p                                   (L2 decay, as torch)
        s = s + g^2                                    (s starts at initial_accumulator_value)
        p = p - lr / (1 + (k - 1) lr_decay) * g / (sqrt(s) + eps)

    with k the parameter's step count (1 on its first update). With a schedule, lr is the scheduled lr of the step,
    and ``lr_decay`` still divides it by the parameter's own step count, as torch.optim.Adagrad does under an
    LRScheduler.

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        lr_decay: the lr of step k is divided by ``1 + (k - 1) lr_decay``.
        weight_decay: L2 decay, added to the gradient (as torch.optim.Adagrad, not decoupled).
        initial_accumulator_value: where the sum of squares starts (>= 0).
        eps: added to the denominator, outside the square root.
    """

    rule = "adagrad"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
                 schedule: Schedule | None = None, backend: str = "auto", state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0, state_rounding: str | None = None,
                 max_grad_norm: float = 0.0, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.Adagrad", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, schedule=schedule,
                        backend=backend, state_dtype=state_dtype, master_weights=master_weights, seed=seed,
                        state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_real("lr_decay", group["lr_decay"])
        check_real("weight_decay", group["weight_decay"])
        check_real("initial_accumulator_value", group["initial_accumulator_value"])
        check_real("eps", group["eps"])


Adagrad.__doc__ += COMMON_ARGS
