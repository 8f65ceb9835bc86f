"""The torch.optim contract every uba_fused optimizer shares: groups, argument checks, per-parameter state (what it
holds, how it is made and fitted to its parameter), state dicts. What ``step()`` does with them is
backends/step.py's.

A subclass sets ``rule`` (the update rule's name in registry.RULES, which says what state it keeps),
its arguments and defaults, and ``_check_hyper(group)``.

Per-parameter state is torch.optim's: ``state[p]["step"]`` (a float32 0-dim
tensor on the parameter's device, as torch's capturable/fused optimizers keep
it) plus the rule's buffers (and SGD-SaI's per-tensor ``gsnr``: Rule.scalar). Each param group carries ``schedule``
and ``schedule_step`` (an int64 0-dim tensor on the group's device counting the
``step()`` calls made so far), so a resumed run continues its schedule exactly.
"""

from __future__ import annotations

import gc
import math
import numbers
import os
import sys
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .. import backends, registry
from ..backends.work import MASTER, codec_of, is_dtensor, local
from ..schedules import SCHEDULE_CLASSES, Schedule, Table, _check_int, schedule_from_dict
from . import blockwise
from .blockwise import ABSMAX, state_dtype_of
from ..backends import step as pipeline  # (after blockwise, which it imports)
from .. import compiled


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.optim flags whose True we cannot honour, and why (in a constructor or in a param group).
_REFUSED_FLAGS = {
    "amsgrad": "amsgrad=True is not implemented by uba_fused",
    "maximize": "maximize=True is not supported: minimize the negated objective instead",
    "differentiable": "differentiable=True is not supported: the update runs in place, outside autograd",
}


def check_torch_flags(owner: str, *, amsgrad: bool = False, maximize: bool = False, foreach: bool | None = None,
                      capturable: bool = False, differentiable: bool = False, fused: bool | None = None) -> None:
    """torch.optim's implementation flags, taken where their meaning holds: every uba_fused step is one
    fused, capturable update, so ``foreach``, ``capturable`` and ``fused=True`` change nothing. The rest
    raises with the reason. ``backend=`` is what chooses the implementation."""
    for name, value in (("amsgrad", amsgrad), ("maximize", maximize), ("differentiable", differentiable),
                        ("capturable", capturable), ("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")
        if value and name in _REFUSED_FLAGS:
            raise ValueError(f"{owner}: {_REFUSED_FLAGS[name]}")
    if fused is False:
        raise ValueError(f"{owner}: fused=False asks for an unfused step; uba_fused chooses its implementation with "
                         f"backend= (backend='torch' is the unfused, per-tensor one)")


def check_real(name: str, value: Any, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> None:
    """Raise unless ``value`` is a finite real in [lo, hi] (or [lo, hi) with ``hi_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    ok = math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be finite and in {interval}, got {value}")


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must be a real floating-point scalar, got shape {tuple(lr.shape)} "
                             f"and dtype {lr.dtype}")
        return  # its value lives on the device; reading it here would sync
    check_real("lr", lr)


def as_tuple(betas: Any) -> Any:
    """A list of betas as a tuple (as torch.optim stores them); anything else as it is, for check_betas to refuse."""
    return tuple(betas) if isinstance(betas, (tuple, list)) else betas


def check_betas(betas: Any, n: int = 2) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"betas must be a tuple of {n} numbers, got {betas!r}")
    for i, b in enumerate(betas):
        check_real(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)


def _caller_level() -> int:
    """The stacklevel of the first frame outside uba_fused and torch (the user's ``opt.step()``) for warnings."""
    inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _lr_schedulers_of(opt: torch.optim.Optimizer, depth: int = 4) -> list[str]:
    """Names of the torch LR schedulers that drive ``opt``'s param groups, directly or through a wrapper
    (accelerate's, under HF Trainer), found by walking the garbage collector's referrers up from ``opt``.
    Slow, and only called to write a warning, once."""
    found, seen, layer = [], {id(opt)}, [opt]
    for _ in range(depth):
        above = []
        for obj in layer:
            for ref in gc.get_referrers(obj):
                if id(ref) in seen or not (isinstance(ref, dict) or hasattr(ref, "__dict__")) or \
                        isinstance(ref, (types.FrameType, types.ModuleType, types.FunctionType, type)):
                    continue
                seen.add(id(ref))
                if isinstance(ref, torch.optim.lr_scheduler.LRScheduler):
                    if getattr(ref.optimizer, "param_groups", None) is opt.param_groups:
                        found.append(ref)
                else:
                    above.append(ref)
        layer = above
    names = []
    for h in found:
        fns = [getattr(getattr(f, "func", f), "__name__", "") for f in getattr(h, "lr_lambdas", [])]
        names.append(type(h).__name__ + (f"({fns[0]})" if fns and fns[0] else ""))
    return names


_CAPTURED = ("{what} cannot take effect: a CUDA graph captured this optimizer's step, and its replays keep what "
             "they captured (addresses, hyper-parameters). Make such changes before capturing; a tensor lr may "
             "change any time, by fill_().")


class _ParamGroup(dict):
    """A param group that refuses a changed value once a CUDA graph captured the step: the graph's replays
    would go on with the captured one, silently. (torch LR schedulers set ``group["lr"]``.) The groups become these
    at the first capture (``FusedOptimizer._guard_groups``); before it they are plain dicts, as torch.optim's, which
    torch.compile reads (Dynamo's optimizer support takes every group for a plain dict, and fails inside on a
    subclass)."""

    captured = False

    def __setitem__(self, key: str, value: Any) -> None:
        if self.captured and key in self:
            old = self[key]
            same = old is value or not isinstance(old, torch.Tensor) and not isinstance(value, torch.Tensor) and \
                type(old) is type(value) and old == value
            if not same:
                raise backends.CaptureError(_CAPTURED.format(what=f"Setting a param group's {key!r} to {value!r}"))
        super().__setitem__(key, value)


COMMON_ARGS = f"""
    Every uba_fused optimizer also takes, after its own:

        schedule: a uba_fused schedule ({', '.join(SCHEDULE_CLASSES)}) computed on the
            device from the group's step counter: step t runs at ``lr * schedule.factor(t)``. None (the
            default) applies the group's lr as it is, so torch LR schedulers keep working.
        backend: "auto" (the default: the fastest that can run the parameters), "cuda", "triton", "cpu" or
            "torch" (the readable per-tensor spec). An explicit choice that cannot run raises, saying why.
        state_dtype: None (the default) keeps each state buffer in its parameter's dtype, as torch.optim does;
            torch.float32 keeps it in float32, so that the moving averages of bfloat16 or float16 parameters are
            not rounded to 8 or 11 bits at every step (it takes 2x their memory); torch.bfloat16 keeps the state of
            float32 (or bfloat16) parameters in bfloat16, half the bytes, rounded stochastically (state_rounding).
            torch.int8 keeps 8-bit state for float32 and bfloat16 parameters of at least 4096 elements (smaller ones
            keep float32): int8 codes per element and a float32 scale per block of 256 elements in
            ``state["absmax"]``, rounded stochastically too (README: Precision layouts). A DTensor parameter (FSDP2)
            keeps it where its shards are whole rows of whole blocks (sharded on dim 0 only, and the elements of a
            row a multiple of 256), else float32. The update computes in
            float32 either way. It applies to state made after it is set; a state-dict load converts the loaded
            state (to a narrower dtype: rounded to nearest; 8-bit codes through their values).
        state_rounding: how 16-bit or 8-bit state is written after each update: "stochastic" (unbiased, from the
            random bits keyed by ``seed``; each state slot draws its own) or "nearest". None (the default) chooses
            "stochastic" for a 16-bit or 8-bit state_dtype asked for, and "nearest" for state kept in its
            parameter's dtype (torch.optim's rounding). Rounding a moving average to nearest in bfloat16 stalls it:
            0.999 v rounds back to v.
        master_weights: how a 16-bit parameter keeps the precision of its updates (README: Precision layouts).
            None (the default) rounds it to nearest at every step, as torch.optim does. "exact" keeps its float32
            master in ``state["master"]``: for bfloat16 the 16 low bits (int16; the parameter is the high half), for
            float16 a float32 copy; the update is then bit for bit that of a float32 parameter. "8bit" (bfloat16
            only) keeps the next 8 bits (int8): a 24-bit master, to which each update is rounded stochastically.
            "stochastic" rounds the parameter stochastically, unbiased, with no master. A float32 or float64
            parameter in a group with master weights raises.
        seed: the key of the random bits of master_weights="stochastic" or "8bit" and state_rounding="stochastic"
            (an integer in [0, 2**53); 0 by default, the same on every rank, so that replicated parameters stay
            identical). With the group's step counter, the tensor and the element it decides every bit: a run is
            reproducible, and so is a graph replay.
        max_grad_norm: 0 (the default) applies the gradients as they are; > 0 scales every gradient by
            ``min(1, max_grad_norm / (norm + 1e-6))``, norm the L2 norm of all the optimizer's gradients of the
            step: ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` fused into the step. A pre-pass
            computes the norm on the device and the update applies the factor (no sync; ``p.grad`` is left as
            backward wrote it). Each group may set its own, against the one global norm. Needs every parameter
            on one device; with DTensor parameters (FSDP2, HSDP, tensor parallelism), every one a DTensor, and
            then each tensor's share of the norm is all-reduced over the mesh dimensions that shard it (so every
            rank calls ``step()``).
            Under torch.amp.GradScaler the norm is that of the unscaled gradients, as ``scaler.unscale_(opt)``
            then ``clip_grad_norm_`` compute it, and a non-finite norm skips the step.

    Under torch.amp.GradScaler, ``scaler.step(opt)`` hands its scale and found_inf to the step, as to torch's fused
    optimizers: the kernels divide each gradient by the scale as they load it (``p.grad`` keeps the scaled values),
    and a step with an inf or NaN gradient changes no parameter, state or step count, without a sync. The group's
    ``schedule_step`` still advances on such a step: the schedule follows the loop's iterations, as a torch LR
    scheduler stepped every iteration does.
        maximize, foreach, capturable, differentiable, fused: torch.optim's flags, taken where their meaning
            holds. Every step is already one fused, capturable update, so ``foreach``, ``capturable`` and
            ``fused=True`` change nothing; ``maximize=True``, ``differentiable=True`` and ``fused=False``
            raise with the reason.
"""

# Options a saved group may lack (torch.optim's have none of them, and older uba_fused ones lack the later
# ones): a load keeps this optimizer's value.
_KEPT_IF_UNSAVED = ("schedule", "backend", "state_dtype", "max_grad_norm", "master_weights", "seed", "state_rounding")
# torch.optim's flags: never asked of a saved group. torch.optim's __setstate__ (run by its load_state_dict, by
# deepcopy and by unpickling) adds 'differentiable' to the defaults of an optimizer whose groups lack it.
_TORCH_FLAGS = ("differentiable", "maximize", "foreach", "capturable", "fused")

_SET_PARAMS = ("params must be an ordered collection (a list, or model.parameters()), not a set: a set's order "
               "changes between runs, and with it which saved state belongs to which parameter")


def _split_names(given: list) -> tuple[list, list[str] | None]:
    """The tensors of a params list and, for ``model.named_parameters()``, their names (as torch.optim)."""
    named = [isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in given]
    if not any(named):
        return given, None
    if not all(named):
        raise ValueError("params must be all tensors or all (name, tensor) pairs, as named_parameters() gives; "
                         f"params[{named.index(False)}] is a {type(given[named.index(False)]).__name__}")
    return [x[1] for x in given], [x[0] for x in given]


def _zeros_like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A state buffer of ``dtype`` for ``p``, laid out as it is: for a DTensor, a DTensor with its mesh and
    placements (so torch.distributed.checkpoint saves and reshards it) around a local shard laid out as ``p``'s."""
    return backends.work.placed_like(torch.zeros_like(local(p), dtype=dtype, memory_format=torch.preserve_format), p)


def _scalar_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of a rule's per-tensor state (Rule.scalar) for ``p``: float32, which the kernels read, or float64 for a
    float64 parameter (which backends "torch" and "cpu" update in float64)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32




def new_master(p: torch.Tensor, codec: str) -> torch.Tensor:
    """The master slot of ``p`` for ``codec``, from ``p`` as it is: a remainder or correction of 0 (the master is the
    parameter), or a float32 copy."""
    if codec in ("remainder", "correction"):
        return _zeros_like(p, master_dtype(codec))
    return _zeros_like(p, torch.float32).copy_(p)


def converted_master(saved: torch.Tensor, codec: str) -> torch.Tensor | None:
    """A saved master slot as ``codec`` keeps it: as it is if of its dtype; a bfloat16 parameter's 16-bit remainder
    as its 8-bit correction (rounded to nearest, ties up, the largest clamped to 127: the 24-bit master within half a
    spacing of the exact one, the parameter unchanged) and the reverse (exact); else None (not convertible)."""
    dtype = master_dtype(codec)
    if saved.dtype == dtype:
        return saved
    if codec == "correction" and saved.dtype == torch.int16:
        return ((saved.to(torch.int32) + 128) >> 8).clamp(max=127).to(torch.int8)
    if codec == "remainder" and saved.dtype == torch.int8:
        return saved.to(torch.int16) << 8
    return None


def fitted_master(p: torch.Tensor, m: Any, codec: str) -> torch.Tensor | None:
    """The master slot ``p`` keeps for ``codec``: ``m`` (its current one, or None) where it is of the codec's dtype and
    laid out as ``p``, else ``m`` converted (converted_master) or, where it cannot be, made from ``p`` as it is; None
    for a codec that keeps none."""
    if codec not in registry.MASTER_DTYPE:
        return None
    if isinstance(m, torch.Tensor) and m.dtype == master_dtype(codec) and local(m).stride() == local(p).stride():
        return m
    kept = converted_master(m, codec) if isinstance(m, torch.Tensor) else None
    return new_master(p, codec) if kept is None else _zeros_like(p, kept.dtype).copy_(kept)


def master_dtype(codec: str | None) -> torch.dtype | None:
    name = registry.MASTER_DTYPE.get(codec)
    return None if name is None else getattr(torch, name)


def check_master_weights(group: dict) -> None:
    """``master_weights`` is one of registry.MASTER_WEIGHTS and can keep every parameter of the group; ``seed`` is an
    integer in [0, 2^53)."""
    mw = group.get("master_weights")  # a group pickled before the option existed has none
    if mw not in registry.MASTER_WEIGHTS:
        raise ValueError(f"master_weights must be None, 'exact', 'stochastic' or '8bit', got {mw!r}")
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**53:
        raise ValueError(f"seed must be an integer in [0, 2**53), got {seed!r}")
    if mw is None:
        return
    for i, p in enumerate(group["params"]):
        if codec_of(group, p) is None and mw == "8bit" and p.dtype == torch.float16:
            raise ValueError(f"master_weights='8bit' keeps an 8-bit correction beside bfloat16 parameters only, but "
                             f"params[{i}] is torch.float16 (not the top half of a float32): use 'exact' for it")
        if codec_of(group, p) is None:
            raise ValueError(f"master_weights={mw!r} keeps the updates of 16-bit parameters, but params[{i}] is "
                             f"{p.dtype}, which loses nothing to rounding: put it in a param group with "
                             f"master_weights=None")


def check_state_dtype(group: dict) -> None:
    """``state_dtype`` is None, torch.float32, torch.bfloat16 or torch.int8 (8-bit), not narrower than float32 for a
    float64 parameter, not bfloat16 for a float16 one, and 8-bit for float32 and bfloat16 parameters only (the
    storages the kernels are built for: registry.STORAGES); ``state_rounding`` is None or one of
    registry.STATE_ROUNDINGS, and stochastic not for float16 state."""
    how = group.get("state_rounding")  # a group pickled before the option existed has none
    if how is not None and how not in registry.STATE_ROUNDINGS:
        raise ValueError(f"state_rounding must be None, 'nearest' or 'stochastic', got {how!r}")
    dtype = group.get("state_dtype")
    half = [i for i, p in enumerate(group["params"]) if p.dtype == torch.float16]
    if how == "stochastic" and dtype is None and half:
        raise ValueError(f"state_rounding='stochastic' rounds bfloat16 state, but the state of the float16 parameters "
                         f"{half} of this group is float16 (state_dtype=None): rounded to nearest only; use "
                         f"state_dtype=torch.float32 for them")
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"state_dtype must be None or a torch.dtype (torch.float32, torch.bfloat16, torch.int8), got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype == torch.float16:
        raise ValueError("state_dtype=torch.float16 is not supported: float16 cannot hold a second moment's range (a "
                         "squared gradient under 6e-8 flushes to 0, one over 65504 overflows); use torch.bfloat16")
    if dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"state_dtype must be None (each state in its parameter's dtype), torch.float32, "
                         f"torch.bfloat16 or torch.int8 (8-bit), got {dtype}")
    if dtype == torch.int8:
        for i, p in enumerate(group["params"]):
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"state_dtype=torch.int8 (8-bit state) is built for float32 and bfloat16 parameters, "
                                 f"but params[{i}] is {p.dtype}: put it in a param group with another state_dtype")
    refused = {torch.float64: "in less precision than the parameters themselves; use None for them",
               torch.float16: "in bfloat16, which the kernels are not built for; use None (float16 state) or "
                              "torch.float32 for them"}
    for pdtype, why in refused.items():
        if dtype != torch.float32 or pdtype == torch.float64:
            bad = [i for i, p in enumerate(group["params"]) if p.dtype == pdtype]
            if bad:
                raise ValueError(f"state_dtype={dtype} would keep the state of the {str(pdtype)[6:]} parameters "
                                 f"{bad} of this group {why}")


class _State(defaultdict):
    """``opt.state``: torch.optim's ``defaultdict(dict)``, counting in ``version`` every change of its entries (a
    parameter's state dict set, replaced or dropped), so that a step tells in O(1) whether the per-parameter dicts
    its tables were built from are still the optimizer's. (What each of them holds, ``GradScan.moved`` checks.)
    Methods that may change an entry count one change whether or not they did."""

    version = 0

    def __setitem__(self, key: Any, value: Any) -> None:  # also what defaultdict's __missing__ calls
        super().__setitem__(key, value)
        self.version += 1

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.version += 1

    def __ior__(self, other: Any) -> _State:
        self.version += 1
        return super().__ior__(other)

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> tuple:
        self.version += 1
        return super().popitem()

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.version += 1
        return super().setdefault(key, default)


class FusedOptimizer(torch.optim.Optimizer):
    rule: ClassVar[str]
    _step_optional: ClassVar[bool] = False  # a loaded state may lack 'step' (torch.optim.SGD keeps none)
    # torch.amp.GradScaler.step then hands its scale and found_inf over as attributes (grad_scale, found_inf) for
    # the duration of step(), as to torch's fused optimizers, instead of unscaling the gradients and reading
    # found_inf on the host (a sync) itself: the kernels divide the scale out and skip on found_inf (_amp).
    _step_supports_amp_scaling: ClassVar[bool] = True
    # AdaGrad-Norm's: every gradient is divided by sqrt(param_groups[0]["norm_sum"]) + eps, the sum of the squared
    # global norms so far (backends/step.py: _divisor)
    _divides_by_norm_sum: ClassVar[bool] = False

    def __init__(self, params: Iterable, defaults: dict[str, Any]):
        if isinstance(params, set):  # torch.optim refuses a set only inside a param group
            raise TypeError(_SET_PARAMS)
        self._last_lr: list[torch.Tensor] = []
        self._setup_lr: list[Any] = []  # each group's host lr when last seen: a change under a schedule warns
        self._warned_lr_twice = False
        self._backends: list[str] = []
        self._cuda_devices: tuple[torch.device, ...] = ()  # the groups' CUDA devices (where a step can be captured)
        self._cache = backends.StepCache()  # what makes the next step cheap; never state
        self._captures: list[backends.Capture] = []  # what steps captured into CUDA graphs keep alive
        self._streams: dict[torch.device, tuple] = {}  # per CUDA device, the stream of the last step
        self._grad_norm: torch.Tensor | None = None  # the last clipping step's global norm (grad_norm)
        self._graph_key: int | None = None  # the op's key, and its arguments under torch.compile (compiled.py)
        self._graph_args: compiled.Args | None = None
        super().__init__(params, defaults)
        self.state = _State(dict, self.state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.optim's, which also runs in its load_state_dict, in deepcopy and in unpickling, adds 'differentiable'
        # to the defaults: a flag of torch's, which _checked_state_dict never asks of a saved group (_TORCH_FLAGS).
        super().__setstate__(state)
        if not isinstance(self.state, _State):
            self.state = _State(dict, self.state)
        if not hasattr(self, "_cache"):  # unpickled or deep-copied: rebuild what is not state
            self._cache, self._backends, self._last_lr, self._setup_lr, self._captures, self._streams = \
                backends.StepCache(), [], [], [], [], {}
            self._grad_norm = None
            self._graph_key = self._graph_args = None  # (a copy is another optimizer: another key)
            self._warned_lr_twice = False
            self.param_groups = [dict(g) for g in self.param_groups]  # no graph captured the copy
            for i in range(len(self.param_groups)):
                self._setup_group(i)

    # -- what a subclass defines ------------------------------------------------
    def _state_names(self, group: dict) -> tuple[str, ...]:
        return registry.RULES[self.rule].state_names(group)

    @property
    def _scalars(self) -> tuple[str, ...]:
        """The rule's per-tensor state (Rule.scalar: SGD-SaI's "gsnr"), as a tuple of none or one name."""
        scalar = registry.RULES[self.rule].scalar
        return () if scalar is None else (scalar,)

    def _check_hyper(self, group: dict) -> None:
        raise NotImplementedError

    def _counted_state(self) -> _State:
        """``self.state`` as the ``_State`` that counts its changes (a plain dict assigned to ``opt.state`` is wrapped
        again), for the step to record what its tables were built from (backends/step.py)."""
        if not isinstance(self.state, _State):
            self.state = _State(dict, self.state)
        return self.state

    # -- groups ------------------------------------------------------------------
    def _check_group_at_step(self, gi: int, group: dict) -> tuple:
        """_check_group, skipped while the group's values are the ones last found valid; returns
        the group's signature, which the kernel backends reuse to skip unchanged table uploads."""
        sig = backends.work.signature(group)
        if self._cache.valid.get(gi) != sig:
            self._check_group(group)
            self._warn_if_lr_scheduled_twice(gi, group)
            self._cache.valid[gi] = sig
        return sig

    def _warn_if_lr_scheduled_twice(self, gi: int, group: dict) -> None:
        """Warn once if a group's host lr changed since it was set up while the group has a schedule: the two
        multiply. torch LR schedulers (and the trainers that add one, as HF Trainer does) change that lr."""
        lr, before = group["lr"], self._setup_lr[gi]
        if not isinstance(lr, torch.Tensor) and lr == 0:
            # Whatever schedule, a zero lr stays zero: nothing multiplies. torch.distributed.checkpoint sets it
            # for the step that creates a fresh optimizer's state before loading, and then sets it back.
            return
        changed = lr is not before if isinstance(lr, torch.Tensor) or isinstance(before, torch.Tensor) else lr != before
        self._setup_lr[gi] = lr
        if not changed or group["schedule"] is None or self._warned_lr_twice:
            return
        self._warned_lr_twice = True
        by = ", ".join(_lr_schedulers_of(self)) or "something outside uba_fused (a torch LR scheduler?)"
        warnings.warn(
            f"param_groups[{gi}]['lr'] changed from {before} to {lr}, set by {by}, while the group has "
            f"schedule={group['schedule']!r}: the lr applied is group lr x schedule factor, so the two schedules "
            f"multiply. Keep one: schedule=None with the torch scheduler, or the uba_fused schedule with a constant "
            f"host lr (HF Trainer: lr_scheduler_type='constant'); log the applied lr from opt.get_last_lr().",
            UserWarning, stacklevel=_caller_level())

    def _check_group(self, group: dict) -> None:
        """Every host-side check of a (defaults-filled) group; raises before anything changes."""
        self._check_hyper(group)
        for flag, reason in _REFUSED_FLAGS.items():
            if group.get(flag):
                raise ValueError(f"uba_fused.{type(self).__name__}: {reason}")
        sched = group["schedule"]
        if sched is not None and not isinstance(sched, Schedule):
            raise TypeError(f"schedule must be None or a uba_fused schedule ({', '.join(SCHEDULE_CLASSES)}), "
                            f"got {type(sched).__name__}")
        if group["backend"] not in backends.NAMES:
            raise ValueError(f"backend must be one of {backends.NAMES}, got {group['backend']!r}")
        check_state_dtype(group)
        check_master_weights(group)
        if "max_grad_norm" in group:  # any group that holds it clips by it (Rule.clipping)
            check_real("max_grad_norm", group["max_grad_norm"])
        lr, params = group["lr"], group["params"]
        if isinstance(sched, Table) and params and sched.factors.device != params[0].device:
            raise ValueError(f"schedule: a Table must be on the parameters' device ({params[0].device}), where the "
                             f"kernels read it; got {sched.factors.device}: pass Table(...).to(device)")
        history = group.get("grad_norms")  # (record_grad_norms; group 0's is the one recorded)
        if history is not None and (not isinstance(history, torch.Tensor) or history.dim() != 1 or
                                    history.dtype != torch.float32 or history.numel() < 2 or
                                    history.device != group["schedule_step"].device):
            raise ValueError(f"grad_norms must be a 1-D float32 tensor of at least 2 elements on the group's device "
                             f"({group['schedule_step'].device}), as record_grad_norms makes it; got "
                             f"{type(history).__name__} "
                             f"{tuple(history.shape) if isinstance(history, torch.Tensor) else history!r}"
                             f"{f' {history.dtype} on {history.device}' if isinstance(history, torch.Tensor) else ''}")
        if isinstance(lr, torch.Tensor) and params and lr.device != params[0].device:
            raise ValueError(f"lr as a tensor must be on the parameters' device ({params[0].device}), got {lr.device}: "
                             f"else every step would copy it from there")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_captures", None):
            raise backends.CaptureError(_CAPTURED.format(what="add_param_group: a new param group"))
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"a param group needs 'params'; got the keys {sorted(param_group)}")
        given = param_group["params"]
        if isinstance(given, set):
            raise TypeError(_SET_PARAMS)
        given = [given] if isinstance(given, torch.Tensor) else list(given)
        params, names = _split_names(given)
        labels = [f"params[{i}]" + (f" ({names[i]!r})" if names else "") for i in range(len(params))]
        for what, p in zip(labels, params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{what} must be a torch.Tensor or a (name, tensor) pair, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError(f"{what} is complex ({p.dtype}); complex parameters are not supported")
            if p.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"{what} has dtype {p.dtype}; supported: {_FLOAT_DTYPES}")
            if p.is_sparse:
                raise ValueError(f"{what} is sparse; sparse parameters are not supported")
            if is_dtensor(p):
                backends.work.check_dtensor_param(what, p)
        full = {**self.defaults, **param_group, "params": params}
        self._check_group(full)
        device = params[0].device if params else torch.device("cpu")
        backend = backends.resolve(full["backend"], device, {p.dtype for p in params})
        backends.check_params(backend, labels, params)
        super().add_param_group({**param_group, "params": given})  # torch.optim keeps the names
        group = self.param_groups[-1]
        group.setdefault("schedule_step", torch.zeros((), dtype=torch.int64, device=device))
        self._setup_group(len(self.param_groups) - 1)

    def _setup_group(self, i: int) -> None:
        """Backend choice and lr log of group i (after construction or a state-dict load)."""
        group = self.param_groups[i]
        device = group["schedule_step"].device
        backend = backends.resolve(group["backend"], device, {p.dtype for p in group["params"]})
        last_lr = torch.zeros((), dtype=torch.float32, device=device)
        if isinstance(group["lr"], torch.Tensor):
            last_lr.copy_(group["lr"].reshape(()))  # torch.optim takes a 1-element lr of any shape
        else:
            last_lr.fill_(group["lr"])
        del self._backends[i:], self._last_lr[i:], self._setup_lr[i:]
        self._backends.append(backend)
        self._cuda_devices = tuple(dict.fromkeys(g["schedule_step"].device for g in self.param_groups
                                                 if g["schedule_step"].is_cuda))
        self._last_lr.append(last_lr)
        self._setup_lr.append(group["lr"])
        self._cache.clear()
        if len(self._last_lr) == len(self.param_groups):  # (a load sets up its groups one by one)
            self._graph_args = compiled.args_of(self)

    @property
    def backends(self) -> list[str]:
        """The backend that runs each param group, as resolved from its ``backend`` option."""
        return list(self._backends)

    def get_last_lr(self) -> list[torch.Tensor]:
        """The learning rate applied by the latest ``step()``, one 0-dim float32 tensor per group.

        The tensors live on the device and are updated in place by every step,
        so holding them is free and graph-safe; reading one (``float(t)``)
        syncs, so do it only when you log. Before the first step they hold the
        group's ``lr``.
        """
        return list(self._last_lr)

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the latest step that clipped (``max_grad_norm > 0``) or recorded an L2 norm
        (``record_grad_norms`` with ``grad_norms_ord`` 2): what ``torch.nn.utils.clip_grad_norm_`` returns, a 0-dim
        float32 tensor on the device, of the gradients as backward left them divided by GradScaler's scale (inf or
        NaN where one is); None before such a step.

        The tensor is updated in place by every such step (a captured graph's replays too), so holding it is
        free; reading it (``float(t)``) syncs, so do it only when you log. Under FSDP2 or tensor parallelism it is
        the full model's norm on every rank."""
        return self._grad_norm

    def record_grad_norms(self, total_steps: int | None) -> torch.Tensor | None:
        """Record every step's global gradient norm on the device, for ``uba_fused.Refined`` to refine the next
        run's schedule from: the norm of step t (param group 0's schedule step) goes to ``grad_norms[t]`` for t <
        ``total_steps``. Returns the history (``grad_norms``); None stops recording and drops it.

        The norm is the one Defazio et al.'s refinement weighs for this rule (``grad_norms_ord``): the L2 norm of
        every gradient for SGD's kind (SGD, LARS, SGDP, SGD-SaI), the L1 norm for rules that scale each coordinate
        by its own statistics (AdamW, AdaBelief, Adan, Lion, Adagrad, DiffGrad, LAMB, AdamP). Either is of the
        gradients as backward left them, GradScaler's scale divided out, and under FSDP2 or tensor parallelism
        of the full model's gradients on every rank.

        Cost: an L2 norm is clipping's pre-pass (free where the step clips: the same norm); an L1 norm is one pass
        of its own over the gradients (``torch._foreach_norm``), and with DTensor parameters one more all-reduce of
        a scalar. Nothing syncs with the host and a CUDA graph can capture it. The history is a float32 tensor on
        param group 0's device, NaN where no step was recorded and inf where the norm was not finite (a step
        GradScaler skipped); it is ``param_groups[0]["grad_norms"]`` (one slot more, which steps past the budget
        write), saved in state dicts, torch.distributed.checkpoint's included, so a resumed run keeps it. Every
        param group must be on one device, and with DTensor parameters every parameter a DTensor."""
        if self._captures:
            raise backends.CaptureError(_CAPTURED.format(what="record_grad_norms"))
        group = self.param_groups[0]
        if total_steps is None:
            group.pop("grad_norms", None)
        else:
            n = _check_int("total_steps", total_steps, 1)
            pipeline._check_global(self, "record_grad_norms records")
            device = group["schedule_step"].device
            group["grad_norms"] = torch.full((n + 1,), math.nan, dtype=torch.float32, device=device)
        self._graph_args = compiled.args_of(self)  # (a compiled step writes the history it is handed)
        return self.grad_norms

    @property
    def grad_norms(self) -> torch.Tensor | None:
        """The recorded history (``record_grad_norms``): a 1-D float32 tensor on the device, one norm per step of the
        budget, written in place by every step (reading it syncs); None when not recording."""
        history = self.param_groups[0].get("grad_norms")
        return None if history is None else history[:-1]

    @property
    def grad_norms_ord(self) -> int:
        """Which norm ``record_grad_norms`` records for this rule: 2 (L2; SGD's kind) or 1 (L1; Adam's kind), the
        ``ord`` to pass to ``uba_fused.Refined``."""
        return registry.RULES[self.rule].grad_norms_ord

    # -- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            compiled.step(self)  # the custom op uba_fused::step: no graph break
        else:
            compiled.skip_eager_frames()  # (once Dynamo is loaded: never traced as a frame of its own)
            pipeline.run(self)  # eager: without a wrapper's cost (7 us of a step's host time on a 2-core VM)
        return loss

    def _guard_groups(self) -> None:
        """After a step was captured into a CUDA graph: every param group refuses a changed value from now on
        (``_ParamGroup``, which replaces each group dict in ``param_groups``: a reference to a group taken before the
        capture is not guarded)."""
        self.param_groups[:] = [g if isinstance(g, _ParamGroup) else _ParamGroup(g) for g in self.param_groups]
        for group in self.param_groups:
            group.captured = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's; under torch.compile, traced (torch's is not: a graph break, which ``fullgraph=True`` refuses)
        over the parameters the compiled step takes (compiled.py)."""
        args = self._graph_args
        if not torch.compiler.is_compiling() or args is None:
            super().zero_grad(set_to_none)
            return
        for p in args.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.requires_grad_(False)
                    p.grad.zero_()

    # -- state: made and fitted where the step needs it (backends/step.py calls these) -------------------------
    def _fit_state(self) -> None:
        """Before the selections are built afresh: every parameter that has state must still be where its state
        is, and shaped as it (a parameter moved to another device, or given data of another shape, since its state
        was made raises, naming it); a kernel backend's parameters must be on their group's device. Then a
        state buffer of a dtype that no longer goes with its parameter's (``model.half()`` after fp32 steps, then
        ``model.float()``) is cast to the group's state dtype for it, and one laid out unlike its parameter
        is copied into the parameter's layout, which the kernels walk."""
        for gi, group in enumerate(self.param_groups):
            device = group["schedule_step"].device
            kernel = self._backends[gi] not in backends.READS_GRADS
            for i, p in enumerate(group["params"]):
                where = f"param_groups[{gi}]['params'][{i}]"
                if kernel and p.device != device:
                    raise ValueError(f"{where} is on {p.device}, its param group's step counter on {device}: the "
                                     f"parameters moved since the optimizer was made; build the optimizer after "
                                     f"moving the model (or load its state dict into a new one)")
                for n, v in self.state.get(p, {}).items():
                    if n in ("step", ABSMAX, *self._scalars) or not isinstance(v, torch.Tensor):
                        continue
                    if v.device != p.device or v.shape != p.shape:
                        raise ValueError(f"{where} is {tuple(p.shape)} on {p.device}, but its state {n!r} is "
                                         f"{tuple(v.shape)} on {v.device}: the parameter changed since its state "
                                         f"was made. Move or reshape the state with it, or drop it "
                                         f"(del opt.state[p]) to start that parameter afresh")
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                st = self.state.get(p, {})
                codec = codec_of(group, p)
                if codec is None:
                    raise ValueError(f"param_groups[{gi}]['params'][{i}] is {p.dtype} now, which its group's "
                                     f"master_weights={group['master_weights']!r} cannot keep: it changed dtype since "
                                     f"the optimizer was made; set the group's master_weights to None for it")
                m = st.get(MASTER)
                if isinstance(m, torch.Tensor) and codec in registry.MASTER_DTYPE:  # the parameter changed dtype or
                    fitted = fitted_master(p, m, codec)  # layout since: converted, or made anew
                    if fitted is not m:
                        st[MASTER] = fitted
                        self._cache.fresh = True
                names = self._state_names(group)
                if blockwise.fit(p, st, self.rule, names, state_dtype_of(group, p), _zeros_like,
                                 f"param_groups[{gi}]['params'][{i}]"):
                    self._cache.fresh = True
                for n in names:
                    v = st.get(n)
                    if not isinstance(v, torch.Tensor) or v.dtype == torch.int8:  # 8-bit: fitted above
                        continue
                    fits = v.dtype in (p.dtype, state_dtype_of(group, p)) or \
                        v.dtype == torch.float32 and p.dtype in (torch.bfloat16, torch.float16)
                    if not fits or local(v).stride() != local(p).stride():
                        st[n] = _zeros_like(p, v.dtype if fits else state_dtype_of(group, p)).copy_(v)
                        self._cache.fresh = True

    def _new_steps(self, params: list[torch.Tensor]) -> None:
        """The step counts of params that have none yet, as 0-dim views of one vector (per device): a selection
        of params that all start together can then advance every count with one op (backend "cpu", where
        one op per 0-dim tensor cost 4 us each on a 2-core VM). Each count is still its own 0-dim tensor."""
        fresh = [p for p in params if "step" not in self.state.get(p, ())]
        self._cache.fresh |= bool(fresh)
        if fresh:
            self._cache.unmeasured = True  # (Rule.measures: their first step)
        for device in dict.fromkeys(p.device for p in fresh):
            mine = [p for p in fresh if p.device == device]
            for p, step in zip(mine, torch.zeros(len(mine), dtype=torch.float32, device=device).unbind()):
                self.state[p]["step"] = step

    def _state_for(self, p: torch.Tensor, names: tuple[str, ...], dtype: torch.dtype, codec: str,
                   initial: dict[str, float]) -> dict:
        """p's state, with every buffer its group keeps: the rule's (``names``, made in ``dtype`` holding 0, or the
        group's ``initial`` value of a slot: Rule.initial), and the master of a codec that keeps one (fitted_master;
        one a codec no longer keeps is dropped)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            self._cache.fresh = True
        made = [n for n in names if n not in state]
        for n in made:
            state[n] = _zeros_like(p, dtype)
            self._cache.fresh = True
        for n in self._scalars:  # one value per tensor, on its device (written where the step measures it)
            if n not in state:
                state[n] = torch.zeros((), dtype=_scalar_dtype(p), device=p.device)
                self._cache.fresh = True
        if any(state[n].dtype == torch.int8 for n in names) and not blockwise.scales_fit(state, self.rule, p):
            state[ABSMAX] = blockwise.new_absmax(p, len(registry.RULES[self.rule].states))
            self._cache.fresh = True
        for n in made:  # a slot that starts elsewhere than 0 (Rule.initial: Adagrad's initial_accumulator_value)
            if initial.get(n, 0.0) != 0.0:
                if state[n].dtype == torch.int8:
                    value = torch.full_like(local(state[n]), initial[n], dtype=torch.float32)
                    blockwise.put(state, self.rule, n, value)
                else:
                    state[n].fill_(initial[n])
        m = state.get(MASTER)
        fitted = fitted_master(p, m, codec)  # a master_weights changed between steps: converted, made or dropped
        if fitted is not m:
            if fitted is None:
                del state[MASTER]
            else:
                state[MASTER] = fitted
            self._cache.fresh = True
        return state

    # -- state dicts -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's, with each group's schedule as a dict and its state_dtype as the dtype's name ("int8"):
        plain values, which torch.distributed's state-dict utilities (a full state dict of FSDP2) walk, and
        ``torch.load(weights_only=True)`` reads."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            if isinstance(g.get("schedule"), Schedule):
                g["schedule"] = g["schedule"].to_dict()
            if isinstance(g.get("state_dtype"), torch.dtype):
                g["state_dtype"] = str(g["state_dtype"]).removeprefix("torch.")
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the matching torch.optim class.

        Everything is checked first; on any error nothing is changed. Keys the
        saved groups lack (a torch.optim state dict has no schedule) keep this
        optimizer's values; ``backend`` always stays this optimizer's.
        """
        if self._captures:  # the graph would go on updating the state it captured, not the loaded one
            raise backends.CaptureError(_CAPTURED.format(what="load_state_dict"))
        state_dict = self._checked_state_dict(state_dict)
        old_groups = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for i, (group, old) in enumerate(zip(self.param_groups, old_groups)):
            for key, value in old.items():
                group.setdefault(key, value)
            group["backend"] = old["backend"]
            device = old["schedule_step"].device
            group["schedule_step"] = torch.as_tensor(group["schedule_step"]).to(device, torch.int64).reshape(())
            for pid, p in zip(state_dict["param_groups"][i]["params"], group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                # torch SGD keeps no step (nor does the sgd-sai package): a saved buffer, or a measured g-SNR, means
                # at least one step was taken.
                default = 1.0 if any(isinstance(st.get(n), torch.Tensor)
                                     for n in (*self._state_names(group), *self._scalars)) else 0.0
                st["step"] = torch.as_tensor(st.get("step", default)).to(p.device, torch.float32).reshape(())
                for n in self._scalars:  # the saved value (torch.optim's load cast it to the parameter's dtype)
                    st[n] = torch.as_tensor(state_dict["state"][pid][n]).to(p.device, _scalar_dtype(p)).reshape(())
                dtype = state_dtype_of(group, p)
                names = self._state_names(group)
                # 8-bit state saved or kept: through its values (torch.optim's load cast codes and scales)
                coded = blockwise.load(p, st, state_dict["state"][pid], self.rule, names, dtype, _zeros_like)
                for n in names:  # the kernels walk state in the parameter's layout
                    v = st.get(n)
                    if not isinstance(v, torch.Tensor) or n in coded:
                        continue
                    recast = v.dtype != dtype  # torch.optim cast it to the parameter's dtype: take the saved value
                    if recast or local(v).stride() != local(p).stride():
                        st[n] = _zeros_like(p, dtype).copy_(state_dict["state"][pid][n] if recast else v)
                # The master: the saved one where it is of this layout's kind (torch.optim's load cast it to the
                # parameter's dtype: take the saved value), converted between a bfloat16 remainder and correction,
                # else made from the parameter as it is; none where the layout keeps none.
                codec, saved = codec_of(group, p), state_dict["state"][pid].get(MASTER)
                st.pop(MASTER, None)
                if codec in registry.MASTER_DTYPE:
                    saved = converted_master(saved, codec) if isinstance(saved, torch.Tensor) else None
                    st[MASTER] = new_master(p, codec) if saved is None else _zeros_like(p, saved.dtype).copy_(saved)
            self._setup_group(i)

    def _checked_state_dict(self, sd: Any) -> dict[str, Any]:
        """The state dict with its schedules as objects, after every check a load needs; raises before any change.

        Another optimizer's state dict is refused: a saved group must hold every hyper-parameter of this
        class, and each parameter's saved state exactly this rule's buffers (and its step), each shaped
        like the parameter."""
        name = f"uba_fused.{type(self).__name__}"
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or \
                not isinstance(sd.get("param_groups"), (list, tuple)):
            raise ValueError("state_dict must be a dict with 'state' (a dict) and 'param_groups' (a list), as "
                             "Optimizer.state_dict() returns")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        hyper = [k for k in self.defaults if k not in _KEPT_IF_UNSAVED and k not in _TORCH_FLAGS]
        groups, listed = [], set()
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict param_groups[{gi}]"
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"{where} must be a dict with 'params' (the parameter ids), got "
                                 f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where} has {len(saved['params'])} parameters, this optimizer's has "
                                 f"{len(group['params'])}")
            missing = [k for k in hyper if k not in saved]
            if missing:
                raise ValueError(f"{where} lacks {', '.join(map(repr, missing))}, which {name} needs; it holds "
                                 f"{sorted(k for k in saved if k != 'params')}: the state dict of another optimizer?")
            saved = dict(saved)
            try:
                if isinstance(saved.get("schedule"), dict):
                    saved["schedule"] = schedule_from_dict(saved["schedule"])
                if isinstance(saved.get("schedule"), Table):  # (read on the group's device)
                    saved["schedule"] = saved["schedule"].to(group["schedule_step"].device)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}['schedule']: {exc}") from None
            for key in ("grad_norms", "norm_sum"):  # (the history and AdaGrad-Norm's sum: on the group's device)
                if isinstance(saved.get(key), torch.Tensor):
                    saved[key] = saved[key].to(group["schedule_step"].device)
            if isinstance(saved.get("state_dtype"), str):  # state_dict() writes a dtype's name
                dtype = getattr(torch, saved["state_dtype"], None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{where}['state_dtype'] must name a torch dtype ('int8', 'bfloat16', "
                                     f"'float32'), got {saved['state_dtype']!r}")
                saved["state_dtype"] = dtype
            if "schedule_step" in saved:
                t = torch.as_tensor(saved["schedule_step"])
                if t.numel() != 1 or t.is_floating_point() or t.is_complex() or int(t) < 0:
                    raise ValueError(f"{where}['schedule_step'] must be a non-negative integer scalar, got "
                                     f"{saved['schedule_step']!r}")
            merged = {**group, **saved, "params": group["params"], "backend": group["backend"]}
            try:
                self._check_group(merged)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
            groups.append(saved)
            listed.update(saved["params"])
            for pid, p in zip(saved["params"], group["params"]):
                if pid in sd["state"]:
                    self._check_saved_state(f"state_dict state[{pid!r}]", sd["state"][pid], p, merged, name)
        unlisted = [pid for pid in sd["state"] if pid not in listed]
        if unlisted:
            raise ValueError(f"state_dict state has entries for parameter ids {unlisted}, which no param group lists")
        return {**sd, "param_groups": groups}

    def _check_saved_state(self, where: str, st: Any, p: torch.Tensor, group: dict, name: str) -> None:
        names = self._state_names(group)
        if not isinstance(st, dict):
            raise ValueError(f"{where} must be a dict, got {type(st).__name__}")
        foreign = [k for k in st if k not in ("step", MASTER, ABSMAX, *names, *self._scalars)]
        if foreign:
            raise ValueError(f"{where} holds {', '.join(map(repr, foreign))}, which {name} does not keep (it keeps "
                             f"{['step', *names, *self._scalars]}): the state dict of another optimizer?")
        lacking = [k for k in (*names, *self._scalars) if st.get(k) is None] + \
            ([] if "step" in st or self._step_optional else ["step"])
        if lacking:
            raise ValueError(f"{where} lacks {', '.join(map(repr, lacking))}, which {name} needs; refilling it "
                             f"would restart that statistic while keeping the rest")
        for key in (*names, *([MASTER] if MASTER in st else [])):
            v = st[key]
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{where}[{key!r}] has shape {shape}, its parameter has {tuple(p.shape)}")
            if backends.work.placement(v) != backends.work.placement(p):
                raise ValueError(f"{where}[{key!r}] is placed {backends.work.placement(v)}, its parameter "
                                 f"{backends.work.placement(p)}: each rank updates the local shard of both, so "
                                 f"they must be placed alike. Load a sharded (FSDP2) optimizer with "
                                 f"torch.distributed.checkpoint's set_optimizer_state_dict, which reshards the "
                                 f"saved state onto the parameters")
        for key in self._scalars:
            v = st[key]
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or not v.is_floating_point():
                raise ValueError(f"{where}[{key!r}] must be a one-element floating-point tensor (one value per "
                                 f"parameter), got {type(v).__name__} "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}")
        coded = [k for k in names if st[k].dtype == torch.int8]
        if coded and not blockwise.scales_fit(st, self.rule, p):
            raise ValueError(f"{where} holds 8-bit state {coded} without its {blockwise.missing(self.rule, p)}"
                             f"{', placed as its rows' if is_dtensor(p) else ''}: the codes mean nothing without them")
        if "step" in st:
            step = torch.as_tensor(st["step"])
            if step.numel() != 1 or not bool(torch.isfinite(step).all()) or float(step) < 0:
                raise ValueError(f"{where}['step'] must be a finite non-negative scalar, got {st['step']!r}")

