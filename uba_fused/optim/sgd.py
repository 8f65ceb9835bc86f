"""SGD with momentum: torch.optim.SGD's semantics."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, check_lr, check_real, check_torch_flags



class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD`` (maximize aside), its arguments in its order and with its defaults::

        g = g + wd p                                   (L2 decay, as torch)
        b = g on a parameter's first step, else momentum b + (1 - dampening) g
        p = p - lr (g + momentum b if nesterov else b)

    ``momentum=0`` is plain SGD and keeps no buffer.

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        momentum: the momentum factor (0: none).
        dampening: how much of the gradient the buffer leaves out, ``1 - dampening`` goes in.
        weight_decay: L2 decay, added to the gradient (as torch.optim.SGD, not decoupled).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
    """

    rule = "sgd"
    _step_optional = True  # torch.optim.SGD keeps no step; a loaded buffer counts as one step taken

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 schedule: Schedule | None = None, backend: str = "auto", state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None,
                 max_grad_norm: float = 0.0, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.SGD", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, schedule=schedule, backend=backend, state_dtype=state_dtype,
                        master_weights=master_weights, seed=seed,
                        state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_real("momentum", group["momentum"])
        check_real("dampening", group["dampening"], 0.0, 1.0)
        check_real("weight_decay", group["weight_decay"])
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"nesterov must be a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"nesterov=True needs momentum > 0 and dampening = 0, got momentum={group['momentum']}, "
                             f"dampening={group['dampening']}")


SGD.__doc__ += COMMON_ARGS
