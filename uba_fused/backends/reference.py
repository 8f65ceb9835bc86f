"""backend="torch": the update rules as readable per-tensor PyTorch.

This file is the specification the Triton and CUDA kernels mirror term by term,
the test oracle, and the fallback for any device. Element-wise math runs in
float32 (float64 for float64 parameters) whatever the storage dtype, as the
kernels do; per-step scalars (schedule factor, bias corrections) are float64
0-dim tensors on the parameters' device, so nothing here syncs with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .work import GradSource, GroupWork


def applied_lr(w: GroupWork) -> torch.Tensor:
    """lr(t) = group lr * factor(t), as a float64 0-dim tensor on the group's device."""
    lr = w.hyper["lr"]
    dev = w.schedule_step.device
    # torch.full, not torch.tensor: a fill on the device, where torch.tensor would copy from the host.
    if isinstance(lr, torch.Tensor):
        lr = lr.to(dev, torch.float64)
    else:
        lr = torch.full((), lr, dtype=torch.float64, device=dev)
    if w.schedule is not None:
        lr = lr * w.schedule.factor_tensor(w.schedule_step)
    return lr


def _adamw(p, g, s, step, lr, h):
    b1, b2 = h["betas"]
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    p.mul_(1.0 - lr * h["weight_decay"])
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.mul_(b1).add_(g, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = v.sqrt().div_(bc2.sqrt()).add_(h["eps"])
    p.sub_(m / denom * (lr / bc1))


def _adabelief(p, g, s, step, lr, h):
    # adabelief-pytorch 0.2: decoupled decay, eps added inside the variance, no rectification.
    b1, b2 = h["betas"]
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    p.mul_(1.0 - lr * h["weight_decay"])
    m, v = s["exp_avg"], s["exp_avg_var"]
    m.mul_(b1).add_(g, alpha=1.0 - b1)
    r = g - m
    v.mul_(b2).addcmul_(r, r, value=1.0 - b2).add_(h["eps"])
    denom = v.sqrt().div_(bc2.sqrt()).add_(h["eps"])
    p.sub_(m / denom * (lr / bc1))


def _lion(p, g, s, step, lr, h):
    b1, b2 = h["betas"]
    m = s["exp_avg"]
    c = m * b1 + g * (1.0 - b1)
    p.mul_(1.0 - lr * h["weight_decay"])
    p.sub_(torch.sign(c) * lr)
    m.mul_(b2).add_(g, alpha=1.0 - b2)


def _sgd(p, g, s, step, lr, h):
    # torch.optim.SGD: L2 decay into the gradient; the buffer starts as the first gradient.
    wd, mom = h["weight_decay"], h["momentum"]
    if wd != 0.0:
        g = g + wd * p
    if mom != 0.0:
        buf = s["momentum_buffer"]
        first = step == 1.0
        buf.copy_(torch.where(first, g, buf * mom + g * (1.0 - h["dampening"])))
        g = g + mom * buf if h["nesterov"] else buf
    p.sub_(g * lr)


UPDATES = {"adamw": _adamw, "adabelief": _adabelief, "lion": _lion, "sgd": _sgd}


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def prepare(rule: str, work: Sequence[GroupWork], cache: dict, grads: GradSource | None) -> Callable[[], None]:
    return lambda: _run(UPDATES[rule], work)  # the gradients are in work (GroupWork.grads)


def _run(update, work: Sequence[GroupWork]) -> None:
    for w in work:
        lr = applied_lr(w)
        w.lr_out.copy_(lr)
        for i, (p, g, step_t) in enumerate(zip(w.params, w.grads, w.steps)):
            step_t.add_(1.0)
            stored = {name: tensors[i] for name, tensors in w.state.items()}
            p32, s32 = _compute(p), {k: _compute(v) for k, v in stored.items()}
            update(p32, _compute(g), s32, step_t.to(torch.float64), lr.to(p32.device), w.hyper)
            for k, v in stored.items():
                if s32[k] is not v:
                    v.copy_(s32[k])
            if p32 is not p:
                p.copy_(p32)
        w.schedule_step.add_(1)
