"""Learning-rate schedules: the one definition every backend mirrors.

A schedule maps a 0-based step index ``t`` (the number of ``step()`` calls made
before the current one) to a multiplier of the group's learning rate::

    lr(t) = group_lr * factor(t)

    warmup   t < W:  factor = (t + 1) / W
    decay    p = clamp((t - W) / (T - W), 0, 1)
             factor = r + (1 - r) * shape(p)          r = min_lr_ratio

    UBA       shape(p) = 2 (1 + cos(pi p)) / (2 phi + (2 - phi) (1 + cos(pi p)))
    Cosine    shape(p) = (1 + cos(pi p)) / 2
    Linear    shape(p) = 1 - p
    REX       shape(p) = (1 - p) / (1 - p / 2)
    Constant  shape(p) = 1   (warmup only)

Past ``T`` the factor stays at ``r``. ``Table`` is any schedule as a tensor of factors, one per step of the budget,
read at index min(t, T - 1): no warmup or shape of its own. ``Refined`` is the Table that Defazio et al.'s
refinement makes from a run's recorded gradient norms.

UBA is the Unified Budget-Aware schedule of Tang et al., "Stepsize anything: a
unified learning rate schedule for budgeted-iteration training", NeurIPS 2025
(arXiv 2505.24452). ``phi > 0`` sets where the decay spends its budget: at
``phi = 2`` the shape is exactly the cosine; ``phi < 2`` keeps the rate high for
longer and drops it late; ``phi > 2`` drops it early and lingers near the end.
Every shape starts at 1 (p = 0) and ends at 0 (p = 1), and is monotone between.

The kernels evaluate the same formulas from ``kernel_constants()``; the tests
tie them to this file.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch

from .registry import KIND

__all__ = ["Schedule", "UBA", "Cosine", "Linear", "REX", "Constant", "Table", "Refined", "LRScheduler", "AppliedLR",
           "schedule_from_dict"]



def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects nan
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _cos(x: torch.Tensor | float) -> torch.Tensor | float:
    return torch.cos(x) if isinstance(x, torch.Tensor) else math.cos(x)


class Schedule:
    """Base class: warmup, then ``r + (1 - r) * shape(p)``. Subclasses define ``_shape`` once, for float64
    tensors (``factor_tensor``, on the device) and Python floats (``factor``, on the host) alike."""

    kind: ClassVar[int]  # the kernels' number for the family: registry.KIND
    _fields: ClassVar[tuple[str, ...]] = ("total_steps", "warmup_steps", "min_lr_ratio")

    def __init__(self, total_steps: int | None, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        # Constant passes total_steps=None; for the budgeted schedules it must be an integer.
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.min_lr_ratio = _check_ratio("min_lr_ratio", min_lr_ratio)
        self.total_steps = None if total_steps is None and self.kind == KIND["constant"] else \
            _check_int("total_steps", total_steps, 1)
        if self.total_steps is not None and self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps must be < total_steps, got warmup_steps={self.warmup_steps}, "
                             f"total_steps={self.total_steps}")

    # -- the definition -----------------------------------------------------
    def _shape(self, p: torch.Tensor | float) -> torch.Tensor | float:
        raise NotImplementedError

    def factor_tensor(self, step: torch.Tensor) -> torch.Tensor:
        """factor(t) for a tensor of step indices, in float64, on the tensor's device, without a sync."""
        t = step.to(torch.float64)
        w = self.warmup_steps
        if self.total_steps is None:
            decay = torch.ones_like(t)
        else:
            p = ((t - w) / (self.total_steps - w)).clamp(0.0, 1.0)
            r = self.min_lr_ratio
            decay = r + (1.0 - r) * self._shape(p)
        if w == 0:
            return decay
        return torch.where(t < w, (t + 1.0) / w, decay)

    def factor(self, step: int) -> float:
        """The lr multiplier at 0-based step index ``step``, computed in float64 on the host: factor_tensor's
        terms on a Python float (a few microseconds where tensor ops on a CPU took 90)."""
        t = _check_int("step", step, 0)
        w = self.warmup_steps
        if t < w:
            return (t + 1.0) / w
        if self.total_steps is None:
            return 1.0
        r = self.min_lr_ratio
        return r + (1.0 - r) * self._shape(min(max((t - w) / (self.total_steps - w), 0.0), 1.0))

    # -- what kernels and state dicts need -----------------------------------
    def kernel_constants(self) -> tuple[int, float, float, float, float]:
        """(kind, warmup_steps, total_steps, min_lr_ratio, phi) as the kernels read them."""
        total = float(self.total_steps if self.total_steps is not None else self.warmup_steps + 1)  # no 0/0
        return (self.kind, float(self.warmup_steps), total, self.min_lr_ratio, float(getattr(self, "phi", 2.0)))

    def to_dict(self) -> dict:
        """A plain dict (safe for ``torch.load(weights_only=True)``); ``schedule_from_dict`` inverts it."""
        return {"name": type(self).__name__, **{k: getattr(self, k) for k in self._fields}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))


class UBA(Schedule):
    """Unified Budget-Aware schedule (Tang et al., NeurIPS 2025). ``phi = 2`` is exactly the cosine."""

    kind = KIND["uba"]
    _fields = ("total_steps", "phi", "warmup_steps", "min_lr_ratio")

    def __init__(self, total_steps: int, *, phi: float = 1.0, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        if isinstance(phi, bool) or not isinstance(phi, numbers.Real):
            raise TypeError(f"phi must be a real number, got {type(phi).__name__} {phi!r}")
        if not (math.isfinite(phi) and phi > 0.0):
            raise ValueError(f"phi must be finite and > 0, got {phi}")
        self.phi = float(phi)
        super().__init__(total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)

    def _shape(self, p):
        c = 1.0 + _cos(math.pi * p)
        return 2.0 * c / (2.0 * self.phi + (2.0 - self.phi) * c)


class Cosine(Schedule):
    """Cosine decay: shape(p) = (1 + cos(pi p)) / 2."""

    kind = KIND["cosine"]

    def __init__(self, total_steps: int, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        super().__init__(total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)

    def _shape(self, p):
        return 0.5 * (1.0 + _cos(math.pi * p))


class Linear(Schedule):
    """Linear decay: shape(p) = 1 - p."""

    kind = KIND["linear"]

    def __init__(self, total_steps: int, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        super().__init__(total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)

    def _shape(self, p):
        return 1.0 - p


class REX(Schedule):
    """REX decay (Chen et al., 2022): shape(p) = (1 - p) / (1 - p / 2)."""

    kind = KIND["rex"]

    def __init__(self, total_steps: int, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        super().__init__(total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)

    def _shape(self, p):
        return (1.0 - p) / (1.0 - 0.5 * p)


class Constant(Schedule):
    """Linear warmup over ``warmup_steps``, then a factor of 1 for ever."""

    kind = KIND["constant"]
    _fields = ("warmup_steps",)

    def __init__(self, *, warmup_steps: int = 0):
        super().__init__(None, warmup_steps=warmup_steps)


class Table(Schedule):
    """Any schedule as a table: ``factor(t) = factors[min(t, total_steps - 1)]``, ``total_steps = len(factors)``.

    ``factors``: the lr factor of every step of the budget, a 1-D floating-point tensor (or a sequence of numbers) of
    finite values >= 0, at least one. It is kept as a float32 tensor on its device: the tensor given, where it is
    one already (contiguous float32), so that filling it in place changes the steps to come, a captured graph's
    replays included; else a float32 copy. The kernels read it on the device, one load per program, so it must be
    on the parameters' device (``to``). ``total_steps``, when given, must equal its length. ``Table.of(schedule,
    total_steps)`` tabulates a closed-form schedule. Saved in state dicts as ``{"name": "Table", "factors": tensor}``
    (``torch.load(weights_only=True)`` reads it); a load replaces the group's table with the saved one, on the
    group's device. Two tables are equal when they read the same tensor. ``factor(t)`` reads one value on the host:
    a sync where the table is on a GPU (the kernels and backend "torch" never do)."""

    kind = KIND["table"]
    _fields = ("factors",)

    def __init__(self, factors: torch.Tensor | list[float] | tuple[float, ...], *, total_steps: int | None = None):
        if not isinstance(factors, torch.Tensor):
            try:
                factors = torch.tensor(factors, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"factors must be a 1-D tensor or a sequence of numbers, got "
                                f"{type(factors).__name__}: {exc}") from None
        if factors.dim() != 1 or not factors.is_floating_point() or factors.numel() == 0:
            raise ValueError(f"factors must be a non-empty 1-D floating-point tensor (one factor per step), got "
                             f"{factors.dtype} of shape {tuple(factors.shape)}")
        if total_steps is not None and _check_int("total_steps", total_steps, 1) != factors.numel():
            raise ValueError(f"factors holds {factors.numel()} steps, total_steps is {total_steps}")
        if not bool((torch.isfinite(factors) & (factors >= 0)).all()):  # (one read, here, not at a step)
            bad = int((~(torch.isfinite(factors) & (factors >= 0))).nonzero()[0])
            raise ValueError(f"factors must be finite and >= 0, got factors[{bad}] = {float(factors[bad])}")
        keep = factors.dtype == torch.float32 and factors.is_contiguous()
        self.factors = factors if keep else factors.to(torch.float32).contiguous()
        self.total_steps, self.warmup_steps, self.min_lr_ratio = factors.numel(), 0, 0.0

    @classmethod
    def of(cls, schedule: Schedule, total_steps: int, device: torch.device | str = "cpu") -> Table:
        """``schedule``'s factor at each of steps 0 .. total_steps - 1 (in float64, kept in float32), on ``device``.
        A closed form's factor is constant from its total_steps T on, so ``of(schedule, T + 1)`` is it at every
        step; ``of(schedule, T)`` stays at its step T - 1 after the budget."""
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a uba_fused schedule, got {type(schedule).__name__}")
        n = _check_int("total_steps", total_steps, 1)
        return cls(schedule.factor_tensor(torch.arange(n)).to(device, torch.float32))

    def to(self, device: torch.device | str) -> Table:
        """This table, or a copy of it on ``device``."""
        return self if self.factors.device == torch.device(device) else Table(self.factors.to(device))

    def factor_tensor(self, step: torch.Tensor) -> torch.Tensor:
        index = step.to(self.factors.device).clamp(0, self.total_steps - 1)
        return self.factors[index].to(step.device, torch.float64)

    def factor(self, step: int) -> float:
        return float(self.factors[min(_check_int("step", step, 0), self.total_steps - 1)])

    def kernel_constants(self) -> tuple[int, float, float, float, float]:
        """(kind, 0, len(factors), 0, 2); the kernels read the table at its address (the plan's group addresses)."""
        return (self.kind, 0.0, float(self.total_steps), 0.0, 2.0)

    def to_dict(self) -> dict:
        return {"name": "Table", "factors": self.factors}

    def __repr__(self) -> str:
        return f"Table(total_steps={self.total_steps}, device={self.factors.device})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and other.factors is self.factors

    def __hash__(self) -> int:
        return id(self.factors)


class Refined(Table):
    """Defazio, Cutkosky, Mehta and Mishchenko's schedule refinement ("When, Why and How Much? Adaptive Learning Rate
    Scheduling by Refinement", arXiv 2310.07831): the Table for a next run, from the gradient norms a run of the same
    budget recorded (``FusedOptimizer.record_grad_norms``)::

        opt = uf.AdamW(params, lr=lr, schedule=uf.Linear(T))
        opt.record_grad_norms(T)
        ...                                                    # train T steps
        refined = uf.Refined(opt.grad_norms, ord=opt.grad_norms_ord)
        opt = uf.AdamW(params, lr=lr2, schedule=refined.to(device))    # the next run, lr2 tuned anew

    ``grad_norms``: one norm per step (a 1-D tensor or sequence, at least 2; inf counts as a norm too large to weigh,
    a step GradScaler skipped; NaN, a step never recorded, raises). ``ord``: which norm it is, 2 (L2) or 1 (L1).

    1. Smoothing: a median filter of odd width ``2 floor(smoothing n / 2) + 1`` over the n norms, the first norm
       repeated before them and the last ones reflected after them (the authors' code: its filter with
       ``mode='nearest'`` over the norms padded by reflection at their end). ``smoothing`` (their tau) in (0, 1]:
       0.1 by default, what their code uses.
    2. Weights: ``lam_t = g_t ** -ord`` of the smoothed norms, ``w_t = lam_t * sum_{s > t} lam_s``: the inverse
       squared L2 norms for SGD's kind, the inverse L1 norms for Adam's kind (the paper's coordinate-wise case),
       the weights the paper derives from its last-iterate bound given those norms, as the authors' code computes
       them. The last step's weight is 0. Constant norms give ``w_t`` proportional to ``T - 1 - t``: linear decay to 0, the paper's
       worst-case schedule.
    3. Normalised to its peak, ``w / max(w)``: the group's lr is the peak lr, to be tuned for the refined run as
       for any schedule.
    4. Warmup: none added by default. The weights make one where the norms fall early in training (large early
       norms weigh little; the paper's refined schedules show it). ``warmup_steps`` > 0 multiplies the first
       steps by ``(t + 1) / warmup_steps``, as the closed forms warm up.

    ``total_steps``: the budget of the next run, by default the history's length n; a shorter budget takes the
    smoothed norms resampled linearly over the run's fraction (t / (T - 1) of it), and a longer one raises (a
    history shorter than the budget). Computed once, in float64 on the host (reading the history: a sync), kept
    in float32 on the history's device; a Table in every other respect (saved as one)."""

    def __init__(self, grad_norms: torch.Tensor | list[float] | tuple[float, ...], *, ord: int,
                 total_steps: int | None = None, smoothing: float = 0.1, warmup_steps: int = 0):
        device = grad_norms.device if isinstance(grad_norms, torch.Tensor) else torch.device("cpu")
        self.ord = ord
        super().__init__(refined_factors(grad_norms, ord=ord, total_steps=total_steps, smoothing=smoothing,
                                         warmup_steps=warmup_steps).to(device, torch.float32))

    def __repr__(self) -> str:
        return f"Refined(total_steps={self.total_steps}, ord={self.ord}, device={self.factors.device})"


def refined_factors(grad_norms: torch.Tensor | list[float] | tuple[float, ...], *, ord: int,
                    total_steps: int | None = None, smoothing: float = 0.1, warmup_steps: int = 0) -> torch.Tensor:
    """``Refined``'s factors, float64 on the CPU; raises, naming the argument, on bad input."""
    if isinstance(ord, bool) or ord not in (1, 2):
        raise ValueError(f"ord must be 1 (L1 norms: Adam's kind) or 2 (L2 norms: SGD's kind), the optimizer's "
                         f"grad_norms_ord; got {ord!r}")
    g = grad_norms if isinstance(grad_norms, torch.Tensor) else torch.tensor(grad_norms, dtype=torch.float64)
    if g.dim() != 1 or not (g.is_floating_point() or g.dtype == torch.int64) or g.numel() < 2:
        raise ValueError(f"grad_norms must be a 1-D tensor of at least 2 norms, one per step, got "
                         f"{g.dtype} of shape {tuple(g.shape)}")
    g = g.detach().to("cpu", torch.float64)
    n = g.numel()
    T = n if total_steps is None else _check_int("total_steps", total_steps, 2)
    if T > n:
        raise ValueError(f"grad_norms holds {n} steps, fewer than total_steps={T}: a history shorter than the "
                         f"budget cannot refine it; record a run of at least that budget")
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be a real number in (0, 1] (the median filter's width, a fraction of "
                         f"the run), got {smoothing!r}")
    warmup = _check_int("warmup_steps", warmup_steps, 0)
    if warmup >= T:
        raise ValueError(f"warmup_steps must be < total_steps, got warmup_steps={warmup}, total_steps={T}")
    bad = torch.isnan(g) | (g <= 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"grad_norms must be > 0 (NaN: a step never recorded), got grad_norms[{i}] = {float(g[i])}")
    half = int(smoothing * n) // 2
    ends = [g[:1].expand(half), g, g.flip(0)[1:half + 1]]  # (half <= n / 2 <= n - 1: the reflection fits)
    smooth = torch.cat(ends).unfold(0, 2 * half + 1, 1).median(dim=1).values
    if T < n:  # resampled over the run's fraction
        x = torch.linspace(0, n - 1, T, dtype=torch.float64)
        lo = x.floor().long().clamp(max=n - 2)
        smooth = smooth[lo] + (x - lo) * (smooth[lo + 1] - smooth[lo])
    if not bool(torch.isfinite(smooth).all()):
        i = int((~torch.isfinite(smooth)).nonzero()[0])
        raise ValueError(f"the smoothed norm of step {i} is not finite: more than half of the norms around it are "
                         f"(steps GradScaler skipped?); record a run where they are finite")
    lam = (smooth / smooth.max()) ** -ord
    after = lam.flip(0).cumsum(0).flip(0)[1:]  # sum over s > t, for t < T - 1
    w = torch.cat([lam[:-1] * after, torch.zeros(1, dtype=torch.float64)])
    if not bool(torch.isfinite(w).all()) or float(w.max()) <= 0:
        raise ValueError(f"grad_norms span too many orders of magnitude to weigh in float64 "
                         f"({float(smooth.min())} .. {float(smooth.max())})")
    w = w / w.max()
    if warmup:
        w[:warmup] *= torch.arange(1, warmup + 1, dtype=torch.float64) / warmup
    return w


SCHEDULE_CLASSES = {c.__name__: c for c in (UBA, Cosine, Linear, REX, Constant, Table)}  # by name, as saved


def schedule_from_dict(d: dict) -> Schedule:
    """Inverse of ``Schedule.to_dict``; a dict that no schedule wrote raises ValueError saying why."""
    if not isinstance(d, dict) or d.get("name") not in SCHEDULE_CLASSES:
        raise ValueError(f"not a schedule dict: {d!r}; expected a 'name' among {sorted(SCHEDULE_CLASSES)}")
    cls = SCHEDULE_CLASSES[d["name"]]
    kwargs = {k: v for k, v in d.items() if k != "name"}
    unknown = sorted(set(kwargs) - set(cls._fields))
    if unknown:
        raise ValueError(f"schedule dict {d!r}: unknown key(s) {unknown}; {cls.__name__} takes {list(cls._fields)}")
    if "total_steps" in cls._fields and "total_steps" not in kwargs:
        raise ValueError(f"schedule dict {d!r}: {cls.__name__} needs 'total_steps'")
    return cls(**kwargs)


class LRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Apply a ``uba_fused`` schedule to ANY torch optimizer, host-side.

    Call ``scheduler.step()`` after each ``optimizer.step()``; the n-th optimizer
    step (0-based) then runs at ``base_lr * schedule.factor(n)``, the same
    learning rate the fused optimizers compute on the device.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a uba_fused schedule (UBA, Cosine, ...), got {type(schedule).__name__}")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        f = self.schedule.factor(max(self.last_epoch, 0))
        return [base_lr * f for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        """torch's scheduler state, with the schedule as a plain dict (``torch.load(weights_only=True)`` reads it)."""
        return {**super().state_dict(), "schedule": self.schedule.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        schedule = state_dict.get("schedule")
        if isinstance(schedule, dict):
            schedule = schedule_from_dict(schedule)
        if not isinstance(schedule, Schedule):
            raise ValueError(f"state_dict['schedule'] must be a schedule dict, got {type(schedule).__name__}")
        super().load_state_dict({**state_dict, "schedule": schedule})


class AppliedLR(torch.optim.lr_scheduler.LRScheduler):
    """A torch LR scheduler for trainers that insist on one, over a uba_fused optimizer with device schedules.

    It never changes a group's ``lr``, so nothing multiplies with the schedule computed in the kernel, and
    its ``get_last_lr()`` reports the lr the latest ``step()`` applied (``optimizer.get_last_lr()``, read
    as floats: that syncs, and trainers read it only when they log). HF Trainer logs it as
    ``learning_rate``: ``Trainer(..., optimizers=(opt, uf.AppliedLR(opt)))``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        if not callable(getattr(optimizer, "get_last_lr", None)):
            raise TypeError(f"AppliedLR reports the lr a uba_fused optimizer applied; got {type(optimizer).__name__}")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]  # left as they are

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in self.optimizer.get_last_lr()]
