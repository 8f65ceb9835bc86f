"""SGD-SaI's gradient signal-to-noise ratio (Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All
You Need"; the sgd-sai package's ``SGD_sai``): the one definition every backend uses.

Each tensor's g-SNR is ``||g|| / (std(g) + eps)`` of its first gradient (std with Bessel's correction, 0 for a
tensor of one element, whose std is NaN, as the package's ``nan_to_num`` makes it), fixed from then on. It is
taken from three sums per tensor (``moments``: registry.GSNR), which add up over the shards of a tensor under FSDP2,
so that a sharded tensor gets the g-SNR of its whole gradient. The gradient as the update applies it (clipped,
GradScaler's scale divided out) is the one backward left times a factor, which ``gsnr`` takes apart: the sums are of
the gradient as it is.

The variance is (sum g^2 - (sum g)^2 / n) / (n - 1) in float64. It loses digits where the gradient's mean is far
above its spread (|mean| / std above 1e6 keeps 4 of float64's 16); the package's two-pass std does not, but then
its g-SNR is above 1e6 sqrt(n) either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def moments(grads: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """float64 [len(grads), 3]: each gradient's sum, sum of squares and count of elements (registry.GSNR), in
    float64 (0 for None: a parameter without a gradient this step, which the step leaves alone). Torch ops on the
    device, one sum per tensor: a step runs them only while some tensor may not have been measured yet."""
    gs = [g for g in grads if g is not None]
    if not gs:
        return torch.zeros((len(grads), 3), dtype=torch.float64, device=device)
    sums = torch.stack([g.sum(dtype=torch.float64) for g in gs])
    squares = torch.stack(torch._foreach_norm(gs, 2, dtype=torch.float64)).square()
    # (fills, not a copy from pageable host memory, which a captured step may not make)
    counts = torch.stack([torch.full((), g.numel(), dtype=torch.float64, device=device) for g in gs])
    rows, none = iter(torch.stack([sums, squares, counts], 1).unbind()), torch.zeros(3, dtype=torch.float64,
                                                                                   device=device)
    return torch.stack([none if g is None else next(rows) for g in grads])


def applied(scale: torch.Tensor | None, wide: bool | torch.Tensor) -> torch.Tensor | float:
    """The factor the update multiplies a gradient by (``scale``, float64; None: 1), as it takes it: rounded to float32
    (a float32 gradient times a 0-dim factor is float32, and the kernels take it so), kept in float64 for a float64
    gradient (``wide``: a bool, or a bool tensor of one per tensor)."""
    if scale is None:
        return 1.0
    return torch.where(torch.as_tensor(wide, device=scale.device), scale, scale.float().double())


def gsnr(sums: torch.Tensor, scale: torch.Tensor | float, eps: torch.Tensor | float) -> torch.Tensor:
    """The g-SNR of each row of ``sums`` (``moments``, summed over shards), float64: that of the gradient times
    ``scale`` (the factor the update multiplies it by), ||s g|| / (std(s g) + eps)."""
    total, squares, count = sums.unbind(-1)
    var = (squares - total * total / count.clamp(min=1.0)) / (count - 1.0).clamp(min=1.0)
    std = torch.where(count > 1.0, var.clamp(min=0.0).sqrt(), 0.0)
    return scale * squares.sqrt() / (scale * std + eps)


# -- when a step measures ---------------------------------------------------------------------------------
# A tensor is measured at its first step: where its step count is 0 before the update. The host cannot read the
# counts without a sync, so it measures (runs the pre-pass) on every step until it knows that every tensor with state
# has taken a step: after a step that measured, the least count is copied to pinned memory behind an event, and a
# later step reads it once the event has passed (``poll``, ``unmeasured``). A step that GradScaler skipped (an inf
# gradient on the first steps is common) counts nothing, so the pre-pass goes on until one was not skipped. A step
# that makes state (a parameter's first gradient) measures again (``StepCache.unmeasured``, set where it is made).


def unmeasured(cache: Any) -> bool:
    """Whether some tensor may not have taken its first step, from what the optimizer's StepCache holds: True (state
    made since, or nothing known), False, or a poll of the least step count (``poll``), read if its event passed (and
    True while not)."""
    known = cache.unmeasured
    if isinstance(known, list):
        if not all(event is None or event.query() for _, event in known):
            return True
        cache.unmeasured = known = not all(bool(least) for least, _ in known)
    return known


def poll(cache: Any, steps: Sequence[torch.Tensor]) -> None:
    """After a step that measured: whether every step count in ``steps`` (every parameter with state) is at least 1,
    per device, copied behind an event to pinned memory for a later ``unmeasured`` to read; no sync."""
    polls = []
    for device in dict.fromkeys(t.device for t in steps):
        least = torch.stack([t for t in steps if t.device == device]).amin() >= 1
        if device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(least, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            polls.append((host, event))
        else:
            polls.append((least, None))
    cache.unmeasured = polls
