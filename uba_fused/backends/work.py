"""What an optimizer hands a backend: one ``GroupWork`` per param group, and where the gradients are.

Every backend is a function ``prepare(rule, work, cache, grads) -> Step`` (see ``backends/__init__.py``).
``prepare`` checks and builds whatever can fail, touching no parameter or state. The ``Step`` it returns is
the step of those groups as a small pipeline, which the optimizer runs stage by stage over every backend:

1. ``grad_sumsq(per_row)``, the pre-pass, only when a group clips its gradients (``max_grad_norm``): launches the
   reduction of the gradients and returns the sum of their squares, a float64 0-dim tensor on the device (or, with
   ``per_row``, each row's: float64 [rows], in ``reduce``'s order of rows). The optimizer adds the backends' sums
   and takes the square root: the global gradient norm. It asks for rows where DTensor parameters are placed
   several ways, each summed over the ranks that shard its tensor (backends/shards.py).
2. ``reduce(norm, amp)``, only for a rule that reads per-tensor sums (Rule.reduces: LARS, LAMB; SGD-SaI's only on a
   step that measures, Rule.measures, whose ``update`` is then handed them, and otherwise None): launches the
   reduction of each parameter and of its gradient (LARS) or of the direction its update will apply (LAMB: from the
   gradient as ``update`` applies it, given the same ``norm`` and ``amp``, and the state, which it leaves as it is),
   and returns their sums of squares, float64 [rows, 2] in an order of the backend's own (``slots()``: each row's
   parameter). The optimizer sums them over the shards of each tensor (FSDP2) and hands them back to ``update``.
3. ``update(norm, amp, sums)``: applies ``rule`` to every parameter listed in ``work`` that has a gradient (one whose
   gradient is None is left as it is), each gradient first divided by GradScaler's scale (``amp``, an ``Amp``;
   None without a scaler) and scaled by its group's clipping factor of the unscaled norm (Rule.clipping;
   ``norm`` is None when no group clips), advances those parameters' ``step`` and each group's
   ``schedule_step`` by one, and writes the learning rate it applied into ``lr_out``. When ``amp.found_inf``
   is non-zero it changes no parameter, state or step count: only the groups' counters advance, and lr_out.

Nothing in either stage syncs with the host. The optimizer has checked the gradients (``check_grads``) and
prepares every backend before it launches any, so an error leaves nothing half-updated. ``cache`` is the
optimizer's ``StepCache`` (backends/cache.py), where a kernel backend keeps device tables between steps (``plans``)
and backend "cpu" its derived lists (``host``); the optimizer clears it when storages may have changed
(``load_state_dict``, ``add_param_group``). Backends "torch" and "cpu" read the gradients from
``GroupWork.grads``; the kernel backends read their addresses from ``grads`` (a ``GradSource``).

A parameter that is a DTensor (FSDP2's sharded parameters) reaches every backend as its local shard
(``local``), with its gradient's and its state's local shards: the rules are element-wise, so each rank
updates what it holds, in the same single launch, and nothing dispatches through DTensor per tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import codec, state_rounding
from ..schedules import Schedule

@dataclass
class GroupWork:
    index: int                     # position in optimizer.param_groups
    hyper: dict[str, Any]          # the param group itself (lr, betas, eps, weight_decay, momentum, ...)
    schedule: Schedule | None      # None: the group's lr is applied as is
    schedule_step: torch.Tensor    # int64 0-dim: step() calls made before this one
    lr_out: torch.Tensor           # float32 0-dim: receives the lr applied by this step
    params: list[torch.Tensor]     # "torch": the parameters that have a gradient; kernel backends: also
                                   # those that have state but no gradient this step
    grads: list[torch.Tensor | None] | None  # aligned with params ("torch"); None when the step took the
                                   # kernel backends' address path, which does not list them
    steps: list[torch.Tensor]      # float32 0-dim per parameter: updates applied so far
    state: dict[str, list[torch.Tensor]]  # per state name (exp_avg, ...), aligned with params
    signature: tuple               # signature(hyper) for this step, computed once by the optimizer
    slots: list[int]               # each param's position in the optimizer's flat parameter order
    masters: list[torch.Tensor | None]  # each param's state "master" (registry.CODECS), None for a codec without
    scales: list[torch.Tensor | None]   # each param's state "absmax" (registry.QUANTIZED), None for other state
    grads_like_params: bool = False  # every gradient in grads is laid out as its parameter (the optimizer's
                                   # C++ pass found it so; False: not known)
    scalars: list[torch.Tensor] | None = None  # each param's per-tensor state (Rule.scalar: a 0-dim tensor),
                                   # None for a rule without


@dataclass
class Step:
    """What a backend's ``prepare`` returns: its groups' step, stage by stage (see the module's docstring)."""

    update: Callable[[torch.Tensor | None, Amp | None, torch.Tensor | None], None]  # the update, given the global
                                            # gradient norm (or None), GradScaler's hand-over (or None) and what
                                            # ``reduce`` returned, summed over shards (or None)
    grad_sumsq: Callable[[bool], torch.Tensor]  # the pre-pass: the sum of squares of the groups' gradients (True:
                                            # each row's, float64 [rows])
    reduce: Callable[[torch.Tensor | None, Amp | None], torch.Tensor]  # the per-tensor pre-pass of a rule with
                                            # Rule.reduces, given what the update is given first: float64 [rows, 2],
                                            # the sums of squares of each tensor and of its gradient or its update's
                                            # direction, in an order of the backend's own (its update reads them back)
    slots: Callable[[], list[int]]          # each row's parameter, of ``reduce``'s rows and ``grad_sumsq``'s: its
                                            # position in the optimizer's flat order (GroupWork.slots); -1, none


@dataclass
class Amp:
    """What torch.amp.GradScaler hands an optimizer that declares ``_step_supports_amp_scaling`` (as torch's fused
    ones do), as attributes set for the duration of ``step()``: the scale the gradients carry (None: they were
    unscaled already, by ``scaler.unscale_``) and ``found_inf`` (non-zero: a gradient is not finite; the step
    changes nothing). One-element float32 tensors on the parameters' device, read by the kernels: no sync."""

    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor


@dataclass
class Selection:
    """What a step hands one group's backend while the set of its parameters taking part holds (the same
    objects step after step, so a backend may key what it derives from them by their ids)."""

    params: list[torch.Tensor]            # local shards, as GroupWork.params
    steps: list[torch.Tensor]             # as GroupWork.steps
    state: dict[str, list[torch.Tensor]]  # as GroupWork.state
    index: list[int] | None               # their positions in the group (None: every parameter)
    slots: list[int]                      # as GroupWork.slots
    masters: list[torch.Tensor | None]    # as GroupWork.masters
    scales: list[torch.Tensor | None]     # as GroupWork.scales
    scalars: list[torch.Tensor] | None = None  # as GroupWork.scalars


@dataclass
class Capture:
    """What one step captured into a CUDA graph keeps for as long as the optimizer lives, because a replay reads
    or writes it after the step returned: the pinned row of gradient addresses its copy reads, the plans whose
    tables its kernels use (they must outlive any rebuild), and the storages of every tensor its kernels write
    (so that a replay never writes memory the optimizer no longer owns, even after ``p.data = ...``). The device
    memory the captured step allocates (its gradient table, copies of gradients in their parameter's layout, the
    clipping norm) is read within each replay only, lives in the graph's private memory pool, and goes with the
    graph."""

    keep: list[Any] = field(default_factory=list)


@dataclass
class GradSource:
    """Where this step's gradients are, for the kernel backends.

    ``addresses`` is an int64 CPU tensor with one entry per parameter of the optimizer, in the order of
    its param groups: the address of the gradient the kernels read (NO_GRAD for none). ``changed`` is
    False when every address is the one the last eager step copied to the device, so a plan's own
    table is current. ``capture`` is set while a CUDA graph captures this step. ``keep`` holds
    temporaries the addresses point into (gradients copied to their parameter's layout).
    """

    addresses: torch.Tensor
    changed: bool
    capture: Capture | None = None
    keep: list[torch.Tensor] = field(default_factory=list)
    pinned: torch.Tensor | None = None  # the staged copy, once made (under capture: a row set aside before)

    def staged(self, device: torch.device) -> torch.Tensor:
        """The addresses where a copy to ``device`` may read them without the host waiting, or a later
        step overwriting them before it ran: for CUDA, a pinned block taken once per step from torch's
        host allocator (which reuses a block only after the copies that read it have run). Under
        capture it is a row of pinned memory set aside before the capture (``GradScan``), which the
        capture keeps: every replay reads it."""
        if device.type != "cuda":
            return self.addresses  # a copy between CPU tensors is done when it returns
        if self.pinned is None:
            self.pinned = self.addresses.pin_memory()
        return self.pinned


# The state buffer that holds a 16-bit parameter's share of its master weight (registry.CODECS: the low 16 bits of a
# bfloat16 parameter's float32 master, as int16, or its next 8 bits, as int8; a float16 parameter's float32 copy).
MASTER = "master"


def slots_of(work: Sequence[GroupWork]) -> list[int]:
    """Each parameter's position in the optimizer's flat order, of the groups' parameters one after another (the
    rows of backends "torch" and "cpu")."""
    return [s for w in work for s in w.slots]


def codec_of(group: dict, p: torch.Tensor) -> str | None:
    """How parameter ``p`` of param group ``group`` is kept between steps (registry.CODECS); None where the group's
    master_weights cannot keep a parameter of its dtype."""
    return codec(group.get("master_weights"), str(p.dtype).removeprefix("torch."))


def state_rounding_of(group: dict) -> str:
    """How param group ``group`` writes its 16-bit state (registry.STATE_ROUNDINGS; float32 state is written as it
    is)."""
    dtype = group.get("state_dtype")
    return state_rounding(group.get("state_rounding"), None if dtype is None else str(dtype).removeprefix("torch."))


def dtensor_class() -> type | None:
    """torch's DTensor class, or None while its module is not loaded (then no DTensor exists). Importing it
    here would add torch.distributed to every ``import uba_fused``."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # the second: torch < 2.5
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def is_dtensor(t: Any) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """What the backends walk: a DTensor's local shard (the tensor FSDP2 keeps, not a copy); any other
    tensor as it is."""
    return t._local_tensor if is_dtensor(t) else t


def placed_like(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``shard`` (a local tensor shaped as DTensor ``like``'s) as a DTensor with ``like``'s mesh, placements, shape
    and stride; ``shard`` itself where ``like`` is no DTensor."""
    if not is_dtensor(like):
        return shard
    return dtensor_class().from_local(shard, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                      stride=like.stride())


def locals_of(ts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``local`` of each (None stays None), for a list visited every step."""
    cls = dtensor_class()
    return ts if cls is None else [t._local_tensor if isinstance(t, cls) else t for t in ts]


def placement(t: torch.Tensor) -> Any:
    return (t.device_mesh, t.placements) if is_dtensor(t) else "not a DTensor"


def check_dtensor_param(what: str, p: torch.Tensor) -> None:
    """A DTensor parameter's placements must let each rank update its local shard alone: any ``Shard`` or
    ``Replicate``. A ``Partial`` parameter holds a summand of its value, which no element-wise rule updates."""
    partial = [pl for pl in p.placements if pl.is_partial()]
    if partial:
        raise ValueError(f"{what} is a DTensor with placements {p.placements}: a Partial parameter holds a summand "
                         f"of each value, which an element-wise update cannot update; redistribute it to Shard or "
                         f"Replicate placements first")


def check_grads(index: int, group: dict, grads: list[torch.Tensor | None]) -> None:
    """Every gradient of group ``index`` dense and shaped, typed and placed like its parameter (a DTensor's
    on the same mesh with the same placements), or None; raises naming the first that is not. The optimizer
    runs this before any backend sees the step."""
    cls = dtensor_class()
    for i, (p, g) in enumerate(zip(group["params"], grads)):
        if g is None:
            continue
        if cls is not None and (isinstance(p, cls) or isinstance(g, cls)) and not _placed_alike(g, p, cls):
            raise RuntimeError(f"{_where(index, group, i)}: its gradient is placed {placement(g)}, the parameter "
                               f"{placement(p)}; the update reads each local shard of the gradient as the "
                               f"parameter's, so their meshes and placements must be the same (a Partial gradient "
                               f"must be reduced first)")
        if g.layout != torch.strided:
            raise RuntimeError(f"{_where(index, group, i)} has a sparse gradient ({g.layout}); uba_fused does not "
                               f"support sparse gradients")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(f"{_where(index, group, i)} has a gradient of shape {tuple(g.shape)}, {g.dtype} on "
                               f"{g.device}, but the parameter is {tuple(p.shape)}, {p.dtype} on {p.device}; the "
                               f"update reads each gradient as its parameter")


def _placed_alike(g: torch.Tensor, p: torch.Tensor, cls: type) -> bool:
    # FSDP2 gives a gradient its parameter's own DTensorSpec: nothing to compare, which is quick.
    return isinstance(g, cls) and isinstance(p, cls) and g._spec is p._spec or placement(g) == placement(p)


def _where(index: int, group: dict, i: int) -> str:
    names = group.get("param_names")
    return f"param_groups[{index}]['params'][{i}]" + (f" ({names[i]!r})" if names else "")


def signature(group: dict) -> tuple:
    """The group's values other than its tensors' contents, cheap to compare step to step: tensors
    (a tensor lr, the counter) stand in by identity, so comparing never reads a device value."""
    return tuple((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v)
                 for k, v in group.items() if k != "params")
