"""The step's orchestration: from an optimizer's param groups and state to its backends' pipeline.

``run(opt)`` is the whole of ``opt.step()`` after its closure. It checks what the tables were built from (``_hold``,
``_check_held``: a parameter or state buffer replaced behind the optimizer's back rebuilds them, or raises under a
captured graph), finds the step's gradients (one C++ pass on the common step, ``_steady_work``; the full pass
otherwise, ``_full_work``, which also makes lazy state through the optimizer), hands each backend its groups' work
(``_selection``, ``_group_work``), and runs the pipeline of backends/work.py: clipping's pre-pass, a rule's
per-tensor sums (each summed over the ranks that shard its tensor: shards.py), the update. It keeps what a CUDA
graph capturing the step needs kept (``_captured``).

The optimizer (optim/base.py) holds the torch.optim contract: groups, argument checks, per-parameter state and how it
is made and fitted (``_state_for``, ``_new_steps``, ``_fit_state``), state dicts. What this module reads of it: its
param_groups, state, rule and ``_state_names``/``_scalars``; and what it keeps between steps, which is no state:
``_cache`` (backends/cache.py), ``_backends``, ``_last_lr``, ``_grad_norm``, ``_cuda_devices``, ``_streams``,
``_captures``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import TYPE_CHECKING

import torch

from .. import backends, registry
from . import shards
from ..optim import blockwise
from ..optim.blockwise import ABSMAX, state_dtype_of
from ..schedules import Table
from .work import MASTER, codec_of, is_dtensor, local

if TYPE_CHECKING:
    from ..optim.base import FusedOptimizer


def run(opt: FusedOptimizer) -> None:
    """One step of ``opt`` (its closure already run)."""
    clips = any(g.get("max_grad_norm", 0) for g in opt.param_groups)
    rule = registry.RULES[opt.rule]
    history = opt.param_groups[0].get("grad_norms")  # (record_grad_norms)
    divides = opt._divides_by_norm_sum  # (AdaGrad-Norm)
    l2 = clips or divides or history is not None and rule.grad_norms_ord == 2  # the pre-pass: the global L2 norm
    if clips or divides or history is not None:
        _check_global(opt, "max_grad_norm > 0 clips by" if clips else "AdaGrad-Norm divides by" if divides else
                      "record_grad_norms records")
    reduces = bool(rule.reduces)
    if reduces:
        _check_reductions(opt)
    capture = backends.Capture() if backends.capturing(opt._cuda_devices) else None
    if opt._cuda_devices:
        backends.stream_of_step(opt._cuda_devices, opt._streams, capture)
    _check_held(opt, capture)
    # A rule that measures at a tensor's first step (Rule.measures) reads the gradients themselves then
    measure = rule.measures and backends.snr.unmeasured(opt._cache)
    work, grads = (None, None) if measure else _steady_work(opt, capture)
    if work is None:
        work, grads = _full_work(opt, capture)
    measure = rule.measures and backends.snr.unmeasured(opt._cache)  # (and where this step made state)
    reduces = reduces and (measure or not rule.measures)
    by_backend = groupby(sorted(work, key=lambda w: opt._backends[w.index]), key=lambda w: opt._backends[w.index])
    steps = [backends.get(name)(opt.rule, list(ws), opt._cache, grads) for name, ws in by_backend]
    norm, amp = None, _amp(opt)
    layout = _layout_of_shards(opt) if l2 or reduces or history is not None else None
    if l2:  # the pre-pass: the global gradient norm (reduce: one backend's sum is used as it is)
        if shards.per_row(layout):  # each row over the ranks that shard its tensor
            sumsq = shards.summed(layout, torch.cat([s.grad_sumsq(True) for s in steps]),
                                  lambda: [i for s in steps for i in s.slots()]).sum()
        else:
            sumsq = shards.summed(layout, functools.reduce(operator.add, [s.grad_sumsq(False) for s in steps]))
        norm = sumsq.sqrt()
        _keep_norm(opt, norm, amp)
    if history is not None:
        _record(opt, history, opt._grad_norm if rule.grad_norms_ord == 2 else _l1_norm(opt, layout, amp))
    if divides:
        amp = _divisor(opt, norm, amp)
    if not clips:
        norm = None  # (recorded only, or AdaGrad-Norm's: no group clips)
    elif amp is not None:  # under GradScaler a non-finite norm skips the step, as an inf gradient does
        found = (~torch.isfinite(norm)).float()
        if amp.found_inf is not None:
            found = found + amp.found_inf.reshape(()).to(found.device, non_blocking=True)
        amp = backends.Amp(amp.grad_scale, found)
    sums = [None] * len(steps)
    if reduces:  # per-tensor sums (LARS's and LAMB's norms), each over the shards of its tensor
        sums = [shards.summed(layout, s.reduce(norm, amp), s.slots) for s in steps]
    for step, mine in zip(steps, sums):
        step.update(norm, amp, mine)
    if measure and capture is None:
        backends.snr.poll(opt._cache, [st["step"] for g in opt.param_groups for p in g["params"]
                                       if "step" in (st := opt.state.get(p, {}))])
    if opt._cache.fresh or opt._cache.held is None:
        _hold(opt)
    if capture is not None:
        _captured(opt, capture)
    elif opt._cache.scan is not None:
        opt._cache.scan.after_eager_step(grads)


def _keep_norm(opt: FusedOptimizer, norm: torch.Tensor, amp: backends.Amp | None) -> None:
    """``opt.grad_norm``: this step's global norm (float64, of the gradients as they are) in float32, GradScaler's
    scale divided out (as the kernels take it: 1 / scale in float32), written in place (capturable)."""
    norm = _unscaled(norm, amp)
    if opt._grad_norm is None or opt._grad_norm.device != norm.device:
        opt._grad_norm = torch.zeros((), dtype=torch.float32, device=norm.device)
    opt._grad_norm.copy_(norm)


def _unscaled(value: torch.Tensor, amp: backends.Amp | None) -> torch.Tensor:
    """A norm of the gradients as backward left them, GradScaler's scale divided out (as the kernels take it: 1 /
    scale in float32)."""
    if amp is None or amp.grad_scale is None:
        return value
    return value * (1.0 / amp.grad_scale.reshape(()).float()).to(value.device, value.dtype)


def _l1_norm(opt: FusedOptimizer, layout: shards.Layout | None, amp: backends.Amp | None) -> torch.Tensor:
    """The L1 norm of every gradient of the step (a rule of Adam's kind records it: Rule.grad_norms_ord), each
    DTensor's summed over the ranks that shard it, GradScaler's scale divided out: one pass of its own over the
    gradients (``torch._foreach_norm``, float32 per tensor; summed in float64), on the device."""
    grads, slots, flat = [], [], 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grads.append(local(p.grad))
                slots.append(flat)
            flat += 1
    device = opt.param_groups[0]["schedule_step"].device
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    rows = torch.stack(torch._foreach_norm(grads, 1, dtype=torch.float32)).double()
    return _unscaled(shards.total(layout, rows, lambda: slots), amp)


def _record(opt: FusedOptimizer, history: torch.Tensor, value: torch.Tensor) -> None:
    """Write this step's norm into the history at its group-0 schedule step t (the last slot takes every step from
    the budget on, and is not shown: FusedOptimizer.grad_norms), in place and on the device: capturable, no sync.
    A norm that is not finite is written as inf (NaN marks a step never recorded)."""
    t = opt.param_groups[0]["schedule_step"].clamp(max=history.numel() - 1).reshape(1)
    value = torch.nan_to_num(value.reshape(1).to(history.dtype), nan=math.inf, posinf=math.inf)
    history.index_copy_(0, t, value)


def _divisor(opt: FusedOptimizer, norm: torch.Tensor, amp: backends.Amp | None) -> backends.Amp:
    """AdaGrad-Norm's step (optim/adagrad.py): add this step's squared global norm (of the unscaled gradients; not
    where GradScaler skips the step) into ``norm_sum``, in place on the device, and hand the kernels the divisor
    ``sqrt(norm_sum) + eps`` as the gradient scale they divide by (GradScaler's scale times it under a scaler)."""
    group = opt.param_groups[0]
    norm_sum = opt.norm_sum
    added = _unscaled(norm, amp).square()
    if amp is not None and amp.found_inf is not None:
        added = torch.where(amp.found_inf.reshape(()).to(added.device) != 0, 0.0, added)
    norm_sum.add_(added.to(norm_sum.device))
    divisor = norm_sum.sqrt() + float(group["eps"])
    if amp is not None and amp.grad_scale is not None:
        divisor = divisor * amp.grad_scale.reshape(()).to(divisor.device, torch.float64)
    return backends.Amp(divisor, None if amp is None else amp.found_inf)


def _amp(opt: FusedOptimizer) -> backends.Amp | None:
    """What torch.amp.GradScaler.step handed over for this step (``grad_scale``, ``found_inf``; see
    ``_step_supports_amp_scaling``), or None. Each is None or a one-element floating-point tensor."""
    scale, found = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if scale is None and found is None:
        return None
    for name, t in (("grad_scale", scale), ("found_inf", found)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point()):
            raise TypeError(f"optimizer.{name}, which torch.amp.GradScaler.step sets for the step, must be None or "
                            f"a one-element floating-point tensor, got {type(t).__name__} "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    return backends.Amp(scale, found)


def _hold(opt: FusedOptimizer) -> None:
    """Record what the device tables and cached selections of this step were built from, for every later step
    to check first (``_check_held``): each parameter with state (its address, dtype and layout: what
    ``p.data = ...`` changes), and the dict entries that name its state buffers, its step count and each
    group's counter (what replacing one changes). The storages of those buffers and counters are kept alive
    instead of checked (one C++ pass over 292 parameters with Adam's state took 31 us per step checking
    all of them, 13 checking these): whatever a user does to their ``.data``, the kernels write memory the
    optimizer holds."""
    opt._counted_state()  # (a plain dict assigned to opt.state: counted again)
    tensors, labels, entries, entry_labels, storages = [], [], [], [], []
    for gi, group in enumerate(opt.param_groups):
        where = f"param_groups[{gi}]"
        entries.append((group, "schedule_step", group["schedule_step"]))
        entry_labels.append(f"{where}['schedule_step'] (replaced)")
        storages.append(group["schedule_step"].untyped_storage())
        names = ("step", *opt._state_names(group), *opt._scalars, MASTER, ABSMAX)
        for i, p in enumerate(group["params"]):
            st = opt.state.get(p)
            if not st or "step" not in st:
                continue
            what = f"{where}['params'][{i}]"
            tensors.append(local(p))
            labels.append(f"{what} (its storage, dtype or layout)")
            for n in names:
                if n in st:
                    entries.append((st, n, st[n]))
                    entry_labels.append(f"{what}'s state {n!r} (replaced)")
                    storages.append(local(st[n]).untyped_storage())
    opt._cache.scan.hold(tensors, entries)
    opt._cache.held = backends.Held(tensors, labels + entry_labels, storages, opt.state,
                                    opt.state.version)
    opt._cache.fresh = False
    from .. import compiled  # (which imports this module)
    opt._graph_args = compiled.args_of(opt)  # what torch.compile's graphs hand the step from now on


def _check_held(opt: FusedOptimizer, capture: backends.Capture | None) -> None:
    """Before anything reads a table: if a tensor the tables point at moved to other memory or changed its
    dtype or layout (``p.data = ...``, ``model.half().float()``, ``module._apply``), or the optimizer's state
    names another tensor (``opt.state[p]["exp_avg"] = ...``), forget every table and selection, so that this
    step rebuilds them from what is there now. The kernels would otherwise write memory the optimizer no
    longer owns. A step being captured, or any step after a capture, raises instead: a graph replays what
    it captured."""
    held = opt._cache.held
    if held is None:
        return
    if opt.state is held.state and opt.state.version == held.version:
        moved = opt._cache.scan.moved()
        if moved < 0:
            return
        what = held.labels[moved]
    else:
        what = "opt.state (a parameter's state set, replaced or dropped)"
    _refuse_if_captured(opt, what, capture)
    opt._cache.clear()


def _refuse_if_captured(opt: FusedOptimizer, what: str, capture: backends.Capture | None) -> None:
    if capture is not None:
        raise backends.CaptureError(
            f"{what} changed since the last eager step, during CUDA-graph capture of step(): the tables the "
            f"graph would read name what was there before. Run an eager step after such a change, then capture")
    if opt._captures:
        raise backends.CaptureError(
            f"{what} changed after a CUDA graph captured this optimizer's step: its replays go on updating the "
            f"tensors it captured (kept alive by the optimizer, so no other memory is written). Move or replace "
            f"parameters and state before capturing")


def _check_global(opt: FusedOptimizer, what: str) -> None:
    """Clipping, and a recorded history, take the norm of every gradient of the step, as one tensor on one device;
    with DTensor parameters, every parameter a DTensor, each summed over the ranks that shard it (shards.py)."""
    devices = {str(g["schedule_step"].device) for g in opt.param_groups}
    if len(devices) > 1:
        raise ValueError(f"{what} the norm of all the optimizer's gradients, which needs every param group on one "
                         f"device; they are on {sorted(devices)}")
    layout = _layout_of_shards(opt)
    if isinstance(layout, str):
        raise ValueError(f"{what} the norm of all the optimizer's gradients; with DTensor parameters it sums each "
                         f"rank's share over the mesh, which needs every parameter to be a DTensor: {layout}. "
                         f"Take the norm outside the step (clip_grad_norm_ before step(), with max_grad_norm=0 and no "
                         f"record_grad_norms)")


def _check_reductions(opt: FusedOptimizer) -> None:
    """A rule that reads per-tensor sums (Rule.reduces) sums each tensor's shards over the ranks that shard it
    (shards.py): with DTensor parameters, every parameter a DTensor; and for a rule that projects per row, none
    sharded across its rows."""
    layout = _layout_of_shards(opt)
    if isinstance(layout, str):
        raise ValueError(f"uba_fused.{type(opt).__name__} sums each tensor's norms over the ranks that shard it, which "
                         f"needs every parameter to be a DTensor: {layout}")
    if layout is not None and registry.RULES[opt.rule].projects:
        across = [pl for pl in layout.placements if any(not p.is_replicate() and getattr(p, "dim", 0) != 0
                                                        for p in pl)]
        if across:
            raise ValueError(f"uba_fused.{type(opt).__name__} sums each row (dim 0) of a parameter on the rank "
                             f"that holds it, which needs the parameters sharded by rows only (FSDP2's Shard(0)), "
                             f"got placements {across[0]}")


def _layout_of_shards(opt: FusedOptimizer) -> shards.Layout | str | None:
    """How the parameters' shares add up over the ranks (shards.layout_of): found once, by the first step that
    sums, and kept in the step cache, which a new param group or a state-dict load clears."""
    if opt._cache.layout is None:
        opt._cache.layout = (shards.layout_of(opt.param_groups),)
    return opt._cache.layout[0]


def _reads_grads(opt: FusedOptimizer, quantifier: Callable[[Iterable[bool]], bool]) -> bool:
    """Whether any / all groups' backends read the gradients themselves rather than device tables."""
    return quantifier(b in backends.READS_GRADS for b in opt._backends)


def _steady_work(opt: FusedOptimizer,
                 capture: backends.Capture | None) -> tuple[list | None, backends.GradSource | None]:
    """The work of a step whose every gradient is present, dense and laid out like its parameter, found
    by one C++ pass (kernel backends only), with the cached selections; (None, None) if not."""
    scan = opt._cache.scan
    grads = scan.steady(capture) if scan is not None and not _reads_grads(opt, any) else None
    if grads is None:
        return None, None
    work = []
    for gi, group in enumerate(opt.param_groups):
        sig = opt._check_group_at_step(gi, group)
        hit = opt._cache.selections.get((gi, None, _layout(opt, group)))
        if hit is None:
            return None, None
        work.append(_group_work(opt, gi, sig, hit, None))
    return work, grads


def _full_work(opt: FusedOptimizer, capture: backends.Capture | None) -> tuple[list, backends.GradSource | None]:
    # Everything that can fail runs before anything is written: every group's values and gradients
    # first, lazy state only after all of them passed, then every backend's prepare before any launch.
    _drop_moved_shards(opt, capture)
    sigs = [opt._check_group_at_step(gi, group) for gi, group in enumerate(opt.param_groups)]
    grads = [[p.grad for p in group["params"]] for group in opt.param_groups]
    # what the backends read: a DTensor's local shard (placed as its parameter, once check() passed)
    shards = [backends.work.locals_of(gs) for gs in grads] if opt._cache.shards else grads

    def check() -> None:
        for gi, group in enumerate(opt.param_groups):
            backends.work.check_grads(gi, group, grads[gi])

    if opt._cache.scan is None:
        opt._cache.scan = backends.GradScan([p for g in opt.param_groups for p in g["params"]])
    source, alike = None, False
    if _reads_grads(opt, all):  # one C++ pass vouches for the common step; Python checks (and explains) the rest
        alike = opt._cache.scan.vouch()
        if not alike:
            check()
    else:  # the kernel backends' pass over the gradients checks them too
        source = opt._cache.scan.full(capture, check, [g for gs in shards for g in gs])
    if not opt._cache.selections:  # built afresh (first step, or something moved): state must still fit
        _check_rows(opt, shards)
        opt._fit_state()
    work = [_group_work(opt, gi, sig, _selection(opt, gi, group, gs, capture), gs, alike)
            for gi, (group, sig, gs) in enumerate(zip(opt.param_groups, sigs, shards))]
    return work, source


def _check_rows(opt: FusedOptimizer, grads: list[list]) -> None:
    """A rule that projects per row (AdamP, SGDP) on a kernel backend sums each row as one block of memory: raise,
    before any state is made, for a parameter with a gradient whose dim 0 is not outermost (backends/plan.py:
    check_rows, which the plan repeats)."""
    if not registry.RULES[opt.rule].projects:
        return
    for gi, group in enumerate(opt.param_groups):
        if opt._backends[gi] in ("triton", "cuda"):
            for i, (p, g) in enumerate(zip(group["params"], grads[gi])):
                if g is not None:
                    backends.plan.check_rows(local(p), f"param_groups[{gi}]['params'][{i}]", opt.rule)


def _drop_moved_shards(opt: FusedOptimizer, capture: backends.Capture | None) -> None:
    """Forget every table and selection if a DTensor parameter's local tensor is not the one they hold:
    FSDP2 gives a sharded parameter a new one when the model's state dict is loaded or it is moved
    (``reset_sharded_param``), and an update of the old one would be lost. Only DTensors are visited.
    The steady path sees such a step as one it cannot vouch for, and leaves it to this one
    (``GradScan._shard_grads``)."""
    held = opt._cache.shards
    if held is not None and any(p._local_tensor is not shard for p, shard in held):
        _refuse_if_captured(opt, "a DTensor parameter's local shard", capture)
        opt._cache.clear()
        held = None
    if held is None:
        opt._cache.shards = [(p, local(p)) for g in opt.param_groups for p in g["params"] if is_dtensor(p)]


def _captured(opt: FusedOptimizer, capture: backends.Capture) -> None:
    """After a step captured into a CUDA graph: keep what its replays read or write after the step returned,
    for the optimizer's life (``backends.Capture``: the storages of what the tables point at among it), and
    refuse from now on what they would not see (a changed hyper-parameter, a new param group, a moved
    parameter)."""
    held = opt._cache.held
    if held is not None:
        storages = [t.untyped_storage() for t in held.tensors] + held.storages
        # (and each Table schedule's factors, which the replays read however the group's schedule is replaced)
        storages += [g["schedule"].factors.untyped_storage() for g in opt.param_groups
                     if isinstance(g["schedule"], Table)]
        for key in ("grad_norms", "norm_sum"):  # (and the history, and AdaGrad-Norm's sum, they write)
            if isinstance(opt.param_groups[0].get(key), torch.Tensor):
                storages.append(opt.param_groups[0][key].untyped_storage())
        capture.keep += list({(s.device, s.data_ptr()): s for s in storages}.values())
    opt._captures.append(capture)
    opt._guard_groups()
    if opt._cache.scan is not None:
        opt._cache.scan.after_captured_step()


def _group_work(opt: FusedOptimizer, gi: int, sig: tuple, selection: backends.Selection, grads: list | None,
                grads_like_params: bool = False) -> backends.GroupWork:
    """Group gi's work from its selection; ``grads``: one per param of the group, or None when the step
    took the kernel backends' address path."""
    group = opt.param_groups[gi]
    if grads is not None and selection.index is not None:
        grads = [grads[i] for i in selection.index]
    return backends.GroupWork(
        index=gi, hyper=group, schedule=group["schedule"], schedule_step=group["schedule_step"],
        lr_out=opt._last_lr[gi], params=selection.params, grads=grads, steps=selection.steps,
        state=selection.state, signature=sig, slots=selection.slots, masters=selection.masters,
        scales=selection.scales,
        grads_like_params=grads_like_params, scalars=selection.scalars)


def _selection(opt: FusedOptimizer, gi: int, group: dict, grads: list,
               capture: backends.Capture | None = None) -> backends.Selection:
    """The params a step hands the group's backend, their step tensors and state lists, their
    positions in the group (None: all of them) and in the optimizer's flat order; cached while the
    selection holds. Under CUDA-graph capture it must be cached already: state made then would live
    in the graph's memory pool.

    Backends "torch" and "cpu" get the params that have a gradient. A kernel backend gets every param that
    has a gradient or state: one without a gradient keeps its table row, with no gradient address,
    and the kernel leaves it alone. So when the set of params with gradients changes from step to
    step (mixture-of-experts routing), the tables stay and only their gradient column changes."""
    names = opt._state_names(group)
    if opt._backends[gi] in backends.READS_GRADS:
        keep = [g is not None for g in grads]
    else:
        keep = [g is not None or "step" in opt.state.get(p, ()) for p, g in zip(group["params"], grads)]
    mask = None if all(keep) else tuple(keep)
    key = (gi, mask, _layout(opt, group))
    hit = opt._cache.selections.get(key)
    if hit is None and capture is not None:
        fresh = [i for i, (p, k) in enumerate(zip(group["params"], keep))
                 if k and "step" not in opt.state.get(p, ())]
        if fresh:
            raise backends.CaptureError(
                f"CUDA-graph capture of step() needs this optimizer's state ready: param_groups[{gi}]['params']"
                f"{fresh} have no state yet. Run eager steps with the same parameters receiving gradients "
                f"before capturing (PyTorch's recipe warms up on a side stream)")
    if hit is None:
        # Keep one partial selection per group (masks can be endless: MoE routing), and none of another layout
        # (state a changed option fits anew, a master converted, is not what those hold)
        for k in [k for k in opt._cache.selections if k[0] == gi and (
                mask is not None and k[1] is not None or k[2] != key[2])]:
            del opt._cache.selections[k]
        index = None if mask is None else [i for i, k in enumerate(keep) if k]
        params = list(group["params"]) if index is None else [group["params"][i] for i in index]
        opt._new_steps(params)
        initial = registry.RULES[opt.rule].initial(group)
        st = [opt._state_for(p, names, state_dtype_of(group, p), codec_of(group, p), initial) for p in params]
        first = sum(len(g["params"]) for g in opt.param_groups[:gi])
        slots = [first + i for i in (range(len(params)) if index is None else index)]
        hit = opt._cache.selections[key] = backends.Selection(
            [local(p) for p in params], [s["step"] for s in st], {n: [local(s[n]) for s in st] for n in names},
            index, slots, [local(s.get(MASTER)) for s in st], [blockwise.flat(s) for s in st],
            *([s[n] for s in st] for n in opt._scalars))
    return hit


def _layout(opt: FusedOptimizer, group: dict) -> tuple:
    """What a group's selection depends on besides its parameters: the state it keeps, how it keeps them (a
    plan makes one launch per storage and state rounding)."""
    return opt._state_names(group), group.get("master_weights"), backends.work.state_rounding_of(group)
