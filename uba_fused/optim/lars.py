"""LARS (You, Gitman and Ginsburg, 2017, "Large Batch Training of Convolutional Networks"), as timm's ``Lars``
computes it: SGD with momentum whose gradient (plus L2 decay) is scaled per tensor by a trust ratio from the norms
of the tensor and of its gradient (apex's LARC, with its clipping as ``trust_clip``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, check_real, check_torch_flags
from .sgd import SGD


class LARS(FusedOptimizer):
    """timm's ``Lars``, its arguments in its order and with its defaults::

        ratio = trust_coeff ||p|| / (||g|| + wd ||p|| + eps)   (1 where ||p|| or ||g|| is 0)
        ratio = min(ratio / lr, 1)                              (trust_clip: LARC)
        g = (g + wd p) ratio                                    (when wd != 0 or always_adapt; else g as it is)
        b = g on a parameter's first step, else momentum b + (1 - dampening) g
        p = p - lr (g + momentum b if nesterov else b)

    The norms are of each whole tensor, taken before the update by a pre-pass over the parameters and gradients on
    the device (per work item, then added per tensor in a fixed order: no atomics, no sync), and summed over the
    shards of a tensor under FSDP2. A clipped or GradScaler-scaled gradient's norm is that of the gradient as the
    update applies it. lr is the applied lr of the step (the schedule's, where there is one), which trust_clip
    divides by.

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        momentum: the momentum factor (0: none, and no buffer).
        dampening: how much of the gradient the buffer leaves out, ``1 - dampening`` goes in.
        weight_decay: L2 decay, added to the gradient before the trust ratio scales it.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        trust_coeff: the trust coefficient (eta in the paper).
        eps: added to the trust ratio's denominator.
        trust_clip: LARC's clipping of the ratio to ``min(ratio / lr, 1)``.
        always_adapt: scale by the trust ratio also in groups without weight decay (timm's default adapts only
            where weight_decay != 0, so that excluded biases and norms run plain SGD).
    """

    rule = "lars"
    _step_optional = True  # a loaded buffer without a step count counts as one step taken, as for SGD

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1.0, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, trust_coeff: float = 0.001,
                 eps: float = 1e-8, trust_clip: bool = False, always_adapt: bool = False, *,
                 schedule: Schedule | None = None, backend: str = "auto", state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0, state_rounding: str | None = None,
                 max_grad_norm: float = 0.0, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.LARS", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
                        schedule=schedule, backend=backend, state_dtype=state_dtype, master_weights=master_weights,
                        seed=seed, state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        SGD._check_hyper(self, group)  # lr, momentum, dampening, weight_decay, nesterov: as SGD's
        check_real("trust_coeff", group["trust_coeff"])
        check_real("eps", group["eps"])
        for name in ("trust_clip", "always_adapt"):
            if not isinstance(group[name], bool):
                raise TypeError(f"{name} must be a bool, got {group[name]!r}")
        if group.get("master_weights") in ("exact", "8bit"):
            raise ValueError(f"master_weights={group['master_weights']!r} is not built for uba_fused.LARS: its trust "
                             f"ratio takes the norm of the parameter as stored, which a master slot extends; use "
                             f"master_weights=None or 'stochastic'")


LARS.__doc__ += COMMON_ARGS
