"""AdamP and SGDP (Heo et al., ICLR 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights"), as the official ``adamp`` package (0.3.0) computes them: the direction's radial part
removed, per output channel or per tensor, where the gradient is nearly orthogonal to the weight."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, as_tuple, check_betas, check_lr, check_real, check_torch_flags

_PROJECTION = """
    The projection, for a parameter of 2 dims or more (``backends/projection.py``)::

        cos_r = |p_r . g_r| / (max(||p_r||, eps) max(||g_r||, eps))    per row r (dim 0: an output channel)
        cos   = the same over the whole tensor
        if max_r cos_r < delta / sqrt(row length):  d_r = d_r - p_r (p_r . d_r) / (||p_r|| + eps)^2   every row
        elif cos < delta / sqrt(numel):             d = d - p (p . d) / (||p|| + eps)^2
        and in either case the decoupled decay is scaled by wd_ratio

    The sums are taken by a pre-pass on the device that computes d without storing anything (per row, in a fixed
    order: no atomics, no sync), and added over the shards of a tensor under FSDP2 (sharded by rows); the update
    computes d again, bit for bit, and applies it. In backends "triton" and "cuda" a parameter of 2 dims or more must
    keep each row in one block of memory (dim 0 outermost: contiguous, or channels_last); backends "torch" and "cpu"
    take any layout.
"""


def _check_projection(group: dict) -> None:
    check_real("eps", group["eps"])
    check_real("delta", group["delta"])
    check_real("wd_ratio", group["wd_ratio"])
    check_real("weight_decay", group["weight_decay"])
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"nesterov must be a bool, got {group['nesterov']!r}")


class AdamP(FusedOptimizer):
    """The ``adamp`` package's ``AdamP``, its arguments in its order and with its defaults::

        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        d = m / (sqrt(v) / sqrt(1 - b2^k) + eps)        (nesterov: (b1 m + (1 - b1) g) in place of m)
        d, r = the projection below of d (r = wd_ratio where it projects, else 1)
        p = p (1 - lr wd r) - lr / (1 - b1^k) d

    with k the parameter's step count (1 on its first update). A step moves 44 bytes per float32 parameter: AdamW's
    28 and the pre-pass's read of p, g, m and v.

    {projection}

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        betas: (b1, b2), the decay rates of the moments.
        eps: added to the denominator, outside the square root; also the projection's.
        weight_decay: decoupled decay (scaled by wd_ratio where the direction is projected).
        delta: the threshold of the projection's cosine test, times 1 / sqrt(the vector's length).
        wd_ratio: the factor of the decay where the direction is projected.
        nesterov: Nesterov momentum in the direction.
    """

    rule = "adamp"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, *, schedule: Schedule | None = None, backend: str = "auto",
                 state_dtype: torch.dtype | None = None, master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None, max_grad_norm: float = 0.0, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        check_torch_flags("uba_fused.AdamP", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov, schedule=schedule, backend=backend,
                        state_dtype=state_dtype, master_weights=master_weights, seed=seed,
                        state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        _check_projection(group)


class SGDP(FusedOptimizer):
    """The ``adamp`` package's ``SGDP``, its arguments in its order and with its defaults (its lr is required there;
    here it defaults to torch.optim.SGD's)::

        b = momentum b + (1 - dampening) g              (b starts at 0, unlike torch.optim.SGD's)
        d = g + momentum b if nesterov else b
        d, r = the projection below of d (r = wd_ratio where it projects, else 1)
        p = p (1 - lr wd r / (1 - momentum)) - lr d
        b = d, without nesterov                        (the package projects the buffer itself, in place)

    A step moves 32 bytes per float32 parameter: SGD's 20 and the pre-pass's read of p, g and b.

    {projection}

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        momentum: the momentum factor, in [0, 1) (the decay divides by 1 - momentum).
        dampening: how much of the gradient the buffer leaves out, ``1 - dampening`` goes in.
        weight_decay: decoupled decay, divided by 1 - momentum (and scaled by wd_ratio where the direction is
            projected).
        nesterov: Nesterov momentum.
        eps: the projection's: in the cosine's norms and added to the norm of p.
        delta: the threshold of the projection's cosine test, times 1 / sqrt(the vector's length).
        wd_ratio: the factor of the decay where the direction is projected.
    """

    rule = "sgdp"

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8,
                 delta: float = 0.1, wd_ratio: float = 0.1, *, schedule: Schedule | None = None,
                 backend: str = "auto", state_dtype: torch.dtype | None = None, master_weights: str | None = None,
                 seed: int = 0, state_rounding: str | None = None, max_grad_norm: float = 0.0,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        check_torch_flags("uba_fused.SGDP", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio, schedule=schedule,
                        backend=backend, state_dtype=state_dtype, master_weights=master_weights, seed=seed,
                        state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_real("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
        check_real("dampening", group["dampening"], 0.0, 1.0)
        _check_projection(group)


for _cls in (AdamP, SGDP):
    _cls.__doc__ = _cls.__doc__.replace("    {projection}", _PROJECTION.strip("\n")) + COMMON_ARGS
