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


class AdagradNorm(FusedOptimizer):
    """AdaGrad-Norm (Ward, Wu and Bottou, 2019; the scalar AdaGrad of AdAdaGrad, Lau et al., arXiv 2402.11215): one
    accumulator for the whole optimizer, of the squared global gradient norm::

        b2 = b2 + ||g||^2                              (||g||: the L2 norm of every gradient of the step;
                                                        b2 starts at initial_accumulator_value)
        p = p - lr g / (sqrt(b2) + eps)

    With a schedule, lr is the scheduled lr of the step. The step is SGD's kernel (rule "sgd", no momentum, no decay)
    whose gradient divisor is ``sqrt(b2) + eps``: the pre-pass that clipping uses takes the norm on the device, and
    the divisor reaches the kernels as GradScaler's scale does (a float32 device scalar; times that scale under a
    GradScaler). Nothing syncs and a CUDA graph can capture it. The divisor is rounded to float32, so a float64
    parameter's update is exact to about 6e-8 of itself.

    The accumulator is ``param_groups[0]["norm_sum"]``, a float64 0-dim tensor on the group's device, saved in state
    dicts. A step GradScaler skips (an inf or NaN gradient) leaves it as it is; without a scaler, an inf or NaN
    gradient makes it inf or NaN, as torch.optim.Adagrad's sums. Every param group must be on one device; with DTensor
    parameters (FSDP2, tensor parallelism), every parameter a DTensor, and the norm is the full model's on every rank.

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device); each group may set its own.
        initial_accumulator_value: where ``b2`` starts (>= 0; Ward et al.'s b0 squared).
        eps: added to ``sqrt(b2)`` (> 0 where ``initial_accumulator_value`` is 0 and a gradient may be 0).
    """

    rule = "sgd"
    _step_optional = True
    _divides_by_norm_sum = True  # backends/step.py: the gradient divisor sqrt(norm_sum) + eps

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-2, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, schedule: Schedule | None = None, backend: str = "auto",
                 state_dtype: torch.dtype | None = None, master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.AdagradNorm", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        # SGD's columns at plain SGD (the kernels' rule), fixed: the rule is SGD with the divisor, nothing more
        defaults = dict(lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps, **_PLAIN_SGD,
                        schedule=schedule, backend=backend, state_dtype=state_dtype, master_weights=master_weights,
                        seed=seed, state_rounding=state_rounding, max_grad_norm=0.0)
        super().__init__(params, defaults)
        self.norm_sum  # (made on group 0's device)

    @property
    def norm_sum(self) -> torch.Tensor:
        """The accumulator ``b2`` (``param_groups[0]["norm_sum"]``): float64, 0-dim, on param group 0's device,
        updated in place by every step (reading it syncs)."""
        group = self.param_groups[0]
        if not isinstance(group.get("norm_sum"), torch.Tensor):  # (a state dict without one: torch.optim.SGD's)
            group["norm_sum"] = torch.full((), float(group["initial_accumulator_value"]), dtype=torch.float64,
                                           device=group["schedule_step"].device)
        return group["norm_sum"]

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_real("initial_accumulator_value", group["initial_accumulator_value"])
        check_real("eps", group["eps"])
        for key, value in _PLAIN_SGD.items():
            if group.get(key, value) != value:
                raise ValueError(f"uba_fused.AdagradNorm: {key} must be {value!r} (AdaGrad-Norm has no {key}), got "
                                 f"{group[key]!r}")
        if group.get("max_grad_norm", 0.0) != 0.0:
            raise ValueError(f"uba_fused.AdagradNorm: max_grad_norm must be 0 (AdaGrad-Norm already divides each "
                             f"step by the accumulated norms), got {group['max_grad_norm']!r}")
        if not group["eps"] > 0 and not group["initial_accumulator_value"] > 0:
            raise ValueError("uba_fused.AdagradNorm: eps or initial_accumulator_value must be > 0, else a first "
                             "gradient of 0 divides 0 by 0")
        norm_sum = group.get("norm_sum")
        if norm_sum is not None and (not isinstance(norm_sum, torch.Tensor) or norm_sum.dtype != torch.float64 or
                                     norm_sum.shape != () or norm_sum.device != group["schedule_step"].device):
            raise ValueError(f"norm_sum must be a float64 0-dim tensor on the group's device "
                             f"({group['schedule_step'].device}), got {type(norm_sum).__name__} "
                             f"{getattr(norm_sum, 'dtype', norm_sum)!r}")

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups and isinstance(param_group, dict):  # (the one accumulator's values: group 0's)
            first = self.param_groups[0]
            for key in ("initial_accumulator_value", "eps"):
                if param_group.get(key, self.defaults[key]) != first[key]:
                    raise ValueError(f"uba_fused.AdagradNorm: {key} belongs to the one accumulator, so every param "
                                     f"group takes param_groups[0]'s ({first[key]!r}), got {param_group[key]!r}")
        super().add_param_group(param_group)


_PLAIN_SGD = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)


AdagradNorm.__doc__ += COMMON_ARGS
