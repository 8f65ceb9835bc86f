"""SGD-SaI (Xu et al., 2024, "No More Adam: Learning Rate Scaling at Initialization is All You Need"), as the official
sgd-sai package's ``SGD_sai`` computes it: SGD with momentum whose step is scaled per tensor by the signal-to-noise
ratio of its gradient, measured once, at its first step."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..schedules import Schedule
from .base import COMMON_ARGS, FusedOptimizer, check_lr, check_real, check_torch_flags


class SGDSaI(FusedOptimizer):
    """The sgd-sai package's ``SGD_sai`` (1.0.3), its arguments in its order and with its defaults::

        gsnr = ||g|| / (std(g) + eps)                  (each tensor's, at its first step; then kept)
        b = g on a parameter's first step, else momentum b + (1 - momentum) g
        p = p (1 - lr wd) - lr gsnr b

    std is the unbiased one, taken as 0 for a one-element tensor (whose std is NaN: the package's ``nan_to_num``).
    The g-SNR is taken on the device from three sums per tensor (backends/snr.py), added over the shards of a tensor
    under FSDP2, so a sharded tensor gets that of its whole gradient. It is the gradient's as the step applies it:
    GradScaler's scale divided out and, with ``max_grad_norm``, clipped. It is kept in ``state[p]["gsnr"]`` (a 0-dim
    tensor, as the package keeps it: float32, float64 for a float64 parameter), so a state dict of the package
    loads. The step runs the pre-pass that
    measures only while some parameter may not have taken its first step (a parameter's first gradient, or a step
    GradScaler skipped, makes it run again); every other step moves SGD's bytes.

    Where the package fails, this one runs: a parameter whose first gradient comes after the optimizer's first step
    is measured at its own first step (the package raises a KeyError), and ``momentum=0`` keeps no buffer and steps
    along the gradient (the package raises a NameError). ``lr`` is the step's applied lr (the schedule's, where there
    is one), which both the decay and the step take.

    Args:
        params: the parameters, or param groups (dicts), or ``named_parameters()``, as torch.optim takes them.
        lr: the peak learning rate (float, or a 0-dim tensor on the parameters' device).
        momentum: the momentum factor, in [0, 1): the buffer's average takes ``1 - momentum`` of each gradient.
        eps: added to the gradient's std in the g-SNR's denominator.
        weight_decay: decoupled decay, ``p (1 - lr wd)``.
    """

    rule = "sgd_sai"
    _step_optional = True  # the package keeps no step: a loaded buffer or g-SNR counts as one step taken

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-2, momentum: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, schedule: Schedule | None = None, backend: str = "auto",
                 state_dtype: torch.dtype | None = None, master_weights: str | None = None, seed: int = 0,
                 state_rounding: str | None = None, max_grad_norm: float = 0.0, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        check_torch_flags("uba_fused.SGDSaI", maximize=maximize, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, schedule=schedule,
                        backend=backend, state_dtype=state_dtype, master_weights=master_weights, seed=seed,
                        state_rounding=state_rounding, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict) -> None:
        check_lr(group["lr"])
        check_real("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
        check_real("eps", group["eps"])
        check_real("weight_decay", group["weight_decay"])


SGDSaI.__doc__ += COMMON_ARGS
