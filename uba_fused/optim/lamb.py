"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"), as timm's
``Lamb`` computes it: Adam's direction plus L2 decay, scaled per tensor by the trust ratio of the norms of the tensor
and of that direction."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, as_tuple, check_betas, check_lr, check_real, check_torch_flags


class LAMB(FusedOptimizer):
    """timm's ``Lamb``, its arguments in its order and with its defaults (it clips at max_grad_norm=1.0)::

        m = b1 m + b3 g                       (b3 = 1 - b1; 1 without grad_averaging)
        v = b2 v + (1 - b2) g^2
        r = m / (1 - b1^k) / (sqrt(v) / sqrt(1 - b2^k) + eps) + wd p     (no bias correction: 1 - b^k is 1)
        ratio = ||p|| / ||r||                  (1 where either is 0; min(ratio, 1) with trust_clip: LAMBC)
        p = p - lr ratio r                     (ratio 1 where weight_decay is 0, unless always_adapt)

    with k the parameter's step count (1 on its first update) and the norms of each whole tensor. They are taken by
    a pre-pass on the device that computes r without storing anything (per work item, then added per tensor in a
    fixed order: no atomics, no sync), summed over the shards of a tensor under FSDP2; the update computes r again,
    bit for bit, and applies it. A step moves 44 bytes per float32 parameter, AdamW's 28 and one more read of p, g,
    m and v. With master weights ("exact", "8bit") ||p|| is the master's norm.

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        bias_correction: divide the moments by 1 - b^k.
        betas: (b1, b2), the decay rates of the moments.
        eps: added to the denominator, outside the square root.
        weight_decay: L2 decay, added to the direction before the trust ratio (not scaled by 1 / the denominator).
        grad_averaging: m takes (1 - b1) g (True) or g (False).
        max_grad_norm: clip every gradient by ``min(1, max_grad_norm / norm)``, norm the L2 norm of all the
            optimizer's gradients (timm's global clipping, without clip_grad_norm_'s 1e-6); 0 or None: no clipping.
        trust_clip: clip the trust ratio at 1 (LAMBC).
        always_adapt: apply the trust ratio also in groups without weight decay (timm's default adapts only where
            weight_decay != 0, so that excluded biases and norms run plain Adam).
    """

    rule = "lamb"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 grad_averaging: bool = True, max_grad_norm: float | None = 1.0, trust_clip: bool = False,
                 always_adapt: bool = False, *, schedule: Schedule | None = None, backend: str = "auto",
                 state_dtype: torch.dtype | None = None, master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.LAMB", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=as_tuple(betas), eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging,
                        max_grad_norm=0.0 if max_grad_norm is None else max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt, schedule=schedule, backend=backend, state_dtype=state_dtype,
                        master_weights=master_weights, seed=seed, state_rounding=state_rounding)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_real("eps", group["eps"])
        check_real("weight_decay", group["weight_decay"])
        for name in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt"):
            if not isinstance(group[name], bool):
                raise TypeError(f"{name} must be a bool, got {group[name]!r}")


LAMB.__doc__ += COMMON_ARGS
