"""The Adam family: AdamW, AdaBelief and Adan, each a declaration of its arguments over one shared check.

The update rules themselves are in backends/reference.py (the spec), with their state and host constants
in registry.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, as_tuple, check_betas, check_lr, check_real, check_torch_flags



class _AdamFamily(FusedOptimizer):
    """What the family checks: an lr, ``n_betas`` betas in [0, 1), eps and a weight decay >= 0."""

    n_betas = 2

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], self.n_betas)
        check_real("eps", group["eps"])
        check_real("weight_decay", group["weight_decay"])


class AdamW(_AdamFamily):
    """Drop-in for ``torch.optim.AdamW`` (amsgrad and maximize aside), with an optional device-side schedule::

        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        p = p (1 - lr wd) - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

    with k the parameter's step count (1 on its first update).

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device, which may change any
            time by ``fill_``). With a schedule, step t runs at ``lr * schedule.factor(t)``.
        betas: (b1, b2), the decay rates of the first and second moments.
        eps: added to the denominator, outside the square root (as torch.optim.AdamW).
        weight_decay: decoupled weight decay, scaled by the applied lr.
        amsgrad: must be False (not implemented).
    """

    rule = "adamw"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 schedule: Schedule | None = None, backend: str = "auto", state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None,
                 max_grad_norm: float = 0.0, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.AdamW", amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                          capturable=capturable, differentiable=differentiable, fused=fused)
        super().__init__(params, dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay,
                                      schedule=schedule, backend=backend, state_dtype=state_dtype,
                                      master_weights=master_weights, seed=seed,
                                      state_rounding=state_rounding, max_grad_norm=max_grad_norm))

    def _check_hyper(self, group: dict) -> None:
        if group.get("decoupled_weight_decay") is False:  # what a torch.optim.Adam state dict holds
            raise ValueError("decoupled_weight_decay=False is torch.optim.Adam's L2 decay; uba_fused.AdamW decays "
                             "decoupled, as torch.optim.AdamW")
        super()._check_hyper(group)


class AdaBelief(_AdamFamily):
    """AdaBelief (Zhuang et al., NeurIPS 2020), as the official adabelief-pytorch 0.2 computes it (decoupled
    decay, eps inside the variance, no rectification)::

        m = b1 m + (1 - b1) g
        s = b2 s + (1 - b2) (g - m)^2 + eps
        p = p (1 - lr wd) - lr / (1 - b1^k) * m / (sqrt(s) / sqrt(1 - b2^k) + eps)

    with k the parameter's step count (1 on its first update).

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        betas: (b1, b2), the decay rates of the mean and of the "belief" (the variance around it).
        eps: added inside the variance and to the denominator (adabelief-pytorch's default 1e-16).
        weight_decay: decoupled weight decay, scaled by the applied lr.
    """

    rule = "adabelief"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, *, schedule: Schedule | None = None,
                 backend: str = "auto", state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None, max_grad_norm: float = 0.0,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.AdaBelief", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        super().__init__(params, dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay,
                                      schedule=schedule, backend=backend, state_dtype=state_dtype,
                                      master_weights=master_weights, seed=seed,
                                      state_rounding=state_rounding, max_grad_norm=max_grad_norm))


class Adan(_AdamFamily):
    """Adan (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm", arXiv 2208.06677), as its PyTorch
    reference (sail-sg/Adan) computes it, with d = g - g_prev (0 on a parameter's first step)::

        m = b1 m + (1 - b1) g
        a = b2 a + (1 - b2) d                      (exp_avg_diff)
        n = b3 n + (1 - b3) (g + b2 d)^2
        u = lr / (1 - b1^k) * m / D + lr b2 / (1 - b2^k) * a / D,   D = sqrt(n) / sqrt(1 - b3^k) + eps
        p = (p - u) / (1 + lr wd)                  (no_prox=True: p = p (1 - lr wd) - u)

    with k the parameter's step count. The state is the reference's: ``exp_avg``, ``exp_avg_sq``,
    ``exp_avg_diff`` and ``neg_pre_grad`` (minus the previous gradient).

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        betas: (b1, b2, b3), the decay rates of the gradient's mean, of its change's mean and of the second
            moment (the reference's defaults, which the paper writes as 1 - 0.02, 1 - 0.08, 1 - 0.01).
        eps: added to the denominator, outside the square root.
        weight_decay: weight decay, scaled by the applied lr.
        max_grad_norm: clipping by the global gradient norm, as below, here in the reference's position and
            with the group's own ``eps`` in ``max_grad_norm / (norm + eps)``, as the reference clips.
        no_prox: how the decay applies: False divides by ``1 + lr wd`` after the update (the proximal form,
            the reference's default), True multiplies by ``1 - lr wd`` before it, as AdamW.
    """

    rule = "adan"
    n_betas = 3

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, no_prox: bool = False, *,
                 schedule: Schedule | None = None, backend: str = "auto", state_dtype: torch.dtype | None = None,
                 master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.Adan", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        super().__init__(params, dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, no_prox=no_prox, schedule=schedule,
                                      backend=backend, state_dtype=state_dtype, master_weights=master_weights,
                                      seed=seed, state_rounding=state_rounding))

    def _check_hyper(self, group: dict) -> None:
        super()._check_hyper(group)
        if not isinstance(group["no_prox"], bool):
            raise TypeError(f"no_prox must be a bool, got {type(group['no_prox']).__name__} {group['no_prox']!r}")


for _cls in (AdamW, AdaBelief, Adan):
    _cls.__doc__ += COMMON_ARGS
