"""diffGrad (Dubey et al., 2019, "diffGrad: An Optimization Method for Convolutional Neural Networks"), as
torch-optimizer's ``DiffGrad`` computes it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .adam import _AdamFamily
from .base import COMMON_ARGS, as_tuple, check_torch_flags


class DiffGrad(_AdamFamily):
    """torch-optimizer's ``DiffGrad``, its arguments in its order and with its defaults::

        g = g + wd p                                     (L2 decay)
        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        xi = 1 / (1 + exp(-|g_prev - g|))                (g_prev: the last step's g, 0 before the first)
        p = p - lr sqrt(1 - b2^k) / (1 - b1^k) * m xi / (sqrt(v) + eps)

    with k the parameter's step count (1 on its first update). The friction xi slows the step where the gradient
    changes little. ``state["previous_grad"]`` keeps g: a step moves 36 bytes per float32 parameter (AdamW's 28 and
    the previous gradient read and written).

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        betas: (b1, b2), the decay rates of the moments.
        eps: added to the denominator, outside the square root.
        weight_decay: L2 decay, added to the gradient (and so to the friction's g).
    """

    rule = "diffgrad"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, schedule: Schedule | None = None,
                 backend: str = "auto", state_dtype: torch.dtype | None = None, master_weights: str | None = None,
                 seed: int = 0, state_rounding: str | None = None, max_grad_norm: float = 0.0, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        check_torch_flags("uba_fused.DiffGrad", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        super().__init__(params, dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay,
                                      schedule=schedule, backend=backend, state_dtype=state_dtype,
                                      master_weights=master_weights, seed=seed, state_rounding=state_rounding,
                                      max_grad_norm=max_grad_norm))


DiffGrad.__doc__ += COMMON_ARGS
