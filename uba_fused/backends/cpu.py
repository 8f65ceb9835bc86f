"""backend="cpu": torch's own fast CPU paths over the whole list; what "auto" takes for CPU parameters.

AdamW, SGD and Adagrad run torch's fused CPU kernels (``torch._fused_adamw_``, ``torch._fused_sgd_``,
``torch._fused_adagrad_``: torch.optim's own rules, the fastest it has on a CPU), LARS its scaled gradients as lists
then SGD's fused kernel. AdaBelief, Lion, Adan, LAMB, DiffGrad, AdamP and SGDP run the list forms of
backends/reference.py (``torch._foreach_*`` ops; AdamP's and SGDP's rows' sums per tensor). The schedule is
computed once per group and step on the host, from schedules.py: a CPU counter is read without a sync. Parameters
stored in bfloat16 or float16 are updated in float32 by the foreach rules and rounded once on the way back, as the
kernels do (torch's fused kernels compute in float32 themselves, but take one dtype for a parameter
and its state: a 16-bit parameter with float32 state goes to them as a float32 copy, and so does every 16-bit
parameter where a check at first use finds the kernel wrong for them: torch 2.11-2.13's SGD, ``_fused_is_right``);
float64 parameters in float64.
A parameter with master weights or stochastic rounding (registry.CODECS) is computed from its float32 master and
written back by its codec (backends/reference.py's decode and encode), so that its update is bit for bit the one of
a float32 parameter. State kept narrower than its parameter (bfloat16 or 8-bit state of float32 parameters), or
rounded stochastically, is updated in float32 copies and written back by its rounding (reference.decode_state and
encode_state).

It reads the gradients from ``GroupWork.grads`` (the parameters that have one), as backend "torch".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..registry import RULES
from .plan import is_dense
from . import reference, snr
from .projection import projection, tensor_sums
from .reference import (FOREACH, READS_NORMS, decode, decode_state, encode, encode_state, grad_scale,
                        lamb_apply_foreach, lamb_direction_foreach, lars_grads, reduce_sums, skipped)
from .cache import StepCache
from .work import Amp, GradSource, GroupWork, Step, codec_of, slots_of, state_rounding_of

_LOW = (torch.bfloat16, torch.float16)
_NARROW = (*_LOW, torch.int8)  # state kept in fewer bits than the update computes in
_FUSED = ("adamw", "sgd", "adagrad")  # the rules torch has fused CPU kernels for
_ONE = torch.ones(())


def prepare(rule: str, work: Sequence[GroupWork], cache: StepCache, grads: GradSource | None) -> Step:
    # resolve() never picks it off the CPU; a direct call gets a sentence, not a host read of device memory
    if not all(w.schedule_step.is_cpu for w in work):
        off = sorted({str(w.schedule_step.device) for w in work} - {"cpu"})
        raise RuntimeError(f"backend 'cpu' updates CPU parameters only, got parameters on {', '.join(off)}")
    def grad_sumsq(per_row: bool = False) -> torch.Tensor:
        rows = _squares([g for w in work for g in w.grads])
        return rows if per_row else rows.sum()

    if RULES[rule].measures:  # SGD-SaI: list forms for plain groups (_sai_run), the reference for others
        return Step(lambda norm, amp, sums: _sai_run(rule, work, cache.host, norm, amp, sums), grad_sumsq,
                    lambda norm, amp: reduce_sums(rule, work, norm, amp), lambda: slots_of(work))
    if RULES[rule].projects:  # AdamP and SGDP: list forms for plain groups (_project_reduce), the reference for others
        return Step(lambda norm, amp, sums: _project_run(rule, work, cache.host, norm, amp, sums), grad_sumsq,
                    lambda norm, amp: _project_reduce(rule, work, cache.host, norm, amp), lambda: slots_of(work))
    return Step(lambda norm, amp, sums: _run(rule, work, cache.host, norm, amp, sums), grad_sumsq,
                lambda norm, amp: _reduce(rule, work, cache.host, norm, amp), lambda: slots_of(work))


def _squares(ts: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum of squares, float64 [len(ts)]: torch's fused norm in float32 (or float64 for float64 tensors;
    asking it for float64 converted each tensor first, 3.9 ms a step of LAMB's on cpu-small), again in float64 for
    those whose float32 squares overflowed (CPU values: read without a sync)."""
    out = torch.zeros(len(ts), dtype=torch.float64)
    for dtype in {t.dtype for t in ts}:  # 16-bit tensors in float32
        idx = [i for i, t in enumerate(ts) if t.dtype == dtype]
        norms = torch._foreach_norm([ts[i] for i in idx], 2, **({"dtype": torch.float32} if dtype in _LOW else {}))
        out[idx] = torch.stack(norms).double()
    for i in (~torch.isfinite(out)).nonzero().flatten().tolist():
        out[i] = torch.linalg.vector_norm(ts[i], dtype=torch.float64)
    return out.square()


def _reduce(rule: str, work: Sequence[GroupWork], host: dict, norm: torch.Tensor | None,
            amp: Amp | None) -> torch.Tensor:
    """reference.reduce_sums, with LAMB's directions over lists (reference.lamb_direction_foreach, the update's own
    ops). A group of float32 (or float64) parameters with state of their dtype keeps its directions and new moments
    for the update (_run), which then only applies them (benchmarks/cpu_step.py: 15 ms a step on cpu-small, 26
    computing them twice); another computes them as its update will, from float32 copies and scaled gradients."""
    if not any(w.params for w in work):
        return reduce_sums(rule, work, norm, amp)
    if not RULES[rule].reduces_direction:
        return torch.stack([_squares([p for w in work for p in w.params]),
                            _squares([g for w in work for g in w.grads])], 1)
    rows = []
    for w in work:
        if not w.params:
            continue
        scale, c = grad_scale(rule, w, norm, amp), RULES[rule].constants(w.hyper)
        ks = [k + 1.0 for k in torch.stack(w.steps).tolist()]
        plain = _plain(w)
        if plain:
            p, m, v = w.params, w.state["exp_avg"], w.state["exp_avg_sq"]
        else:  # float32 copies, as _update computes from
            p = [decode(t, a, codec_of(w.hyper, t)) for t, a in zip(w.params, w.masters)]
            m, v = ([decode_state(t, a, rule, n) for t, a in zip(w.state[n], w.scales)]
                    for n in ("exp_avg", "exp_avg_sq"))
        g, by = [t.float() if t.dtype in _LOW else t for t in w.grads], 1.0 if scale is None else float(scale)
        if not plain and by != 1.0:  # as _update scales them
            g, by = torch._foreach_mul(g, by), 1.0
        r, m, v = lamb_direction_foreach(p, g, m, v, ks, c, by)
        if plain:
            host[("lamb", id(w.params))] = (w.params, r, m, v)
        rows.append(torch.stack([_squares(p), _squares(r)], 1))
    return torch.cat(rows)


def _host_lr(w: GroupWork) -> float:
    """The group's lr this step, on the host (its schedule's factor at its CPU counter: no sync), written to lr_out."""
    lr = float(w.hyper["lr"])
    if w.schedule is not None:
        lr *= w.schedule.factor(int(w.schedule_step))
    w.lr_out.fill_(lr)
    return lr


def _skipped(amp: Amp | None, w: GroupWork) -> bool:
    """GradScaler found an inf or NaN gradient: the step changes nothing but the group's counter."""
    skip = skipped(amp, w.schedule_step.device)
    return skip is not None and bool(skip)


def _plain(w: GroupWork) -> bool:
    """Float32 (or float64) parameters without a codec, and state of their dtype: updated as they are."""
    return all(p.dtype in (torch.float32, torch.float64) and codec_of(w.hyper, p) == "nearest" and
               all(ts[i].dtype == p.dtype for ts in w.state.values()) for i, p in enumerate(w.params))


def _project_reduce(rule: str, work: Sequence[GroupWork], host: dict, norm: torch.Tensor | None,
                    amp: Amp | None) -> torch.Tensor:
    """AdamP's and SGDP's pre-pass (reference.reduce_sums): a plain group's directions and new state as lists
    (reference.projecting_directions_foreach, kept for the update), its rows' sums from float32 products; another
    group's from the per-tensor reference."""
    out = []
    for w in work:
        if not w.params:
            continue
        if not _plain(w):
            out.append(reduce_sums(rule, [w], norm, amp))
            continue
        scale, c = grad_scale(rule, w, norm, amp), RULES[rule].constants(w.hyper)
        g = w.grads if scale is None else torch._foreach_mul(w.grads, float(scale))
        ks = [k + 1.0 for k in torch.stack(w.steps).tolist()]
        d, new = reference.projecting_directions_foreach(rule, w.params, g, w.state, ks, c)
        rows = reference.list_row_sums(w.params, g, d)
        counts = [p.shape[0] if p.dim() > 1 and p.numel() else 0 for p in w.params]
        lengths = torch.tensor(counts, dtype=torch.int64)
        row_len = torch.tensor([p.numel() // n if n else 0 for p, n in zip(w.params, counts)], dtype=torch.float64)
        ones = torch.ones(len(counts), dtype=torch.float64)
        sums = tensor_sums(rows, lengths, row_len, ones * c["delta"], ones * c["eps"])
        host[("project", id(w.params))] = (w.params, d, new, ks, rows, lengths)
        out.append(sums)
    return torch.cat(out) if out else reduce_sums(rule, work, norm, amp)


def _project_run(rule: str, work: Sequence[GroupWork], host: dict, norm: torch.Tensor | None, amp: Amp | None,
                 sums: torch.Tensor) -> None:
    """AdamP's and SGDP's update: a plain group's from _project_reduce's lists (reference.projecting_apply_foreach),
    each row's coefficient and each tensor's decay factor from ``sums`` (summed over shards) by
    projection.projection; another group's by the per-tensor reference."""
    first = 0
    for w in work:
        mine = sums[first:first + len(w.params)]
        first += len(w.params)
        kept = host.pop(("project", id(w.params)), None)  # for this step only
        if kept is None or kept[0] is not w.params:
            reference.run_group(rule, w, norm, amp, mine)
            continue
        _, d, new, ks, rows, lengths = kept
        lr = _host_lr(w)
        if not _skipped(amp, w):
            _advance(w.steps, host)
            c = RULES[rule].constants(w.hyper)
            ones = torch.ones(len(w.params), dtype=torch.float64)
            projected = lengths > 0
            coef, factor = projection(mine, rows, lengths, ones * c["delta"], ones * c["eps"], ones * c["wd_ratio"],
                                      projected)
            # every tensor of 2 dims or more takes d - a p, a = 0 where it is not projected, as reference.py and the
            # kernels compute it (its decay factor cannot tell: wd_ratio may be 1)
            coefs = [t if n else None for t, n in zip(coef.split(lengths.tolist()), lengths.tolist())]
            reference.projecting_apply_foreach(rule, w.params, d, w.state, new, ks, lr, c, coefs, factor.tolist())
        w.schedule_step.add_(1)


def _sai_run(rule: str, work: Sequence[GroupWork], host: dict, norm: torch.Tensor | None, amp: Amp | None,
             sums: torch.Tensor | None) -> None:
    """SGD-SaI's update (reference._sgd_sai) over a plain group's lists, each tensor's g-SNR a host float: measured
    from ``sums`` at its first step (snr.gsnr), rounded as it is kept, and else read once from the state and kept
    for the selection's next steps (a step without sums takes no tensor's first step: snr.unmeasured). The buffer's
    average is one lerp (as the other list forms'). Another group's update by the per-tensor reference."""
    first = 0
    for w in work:
        mine = None if sums is None else sums[first:first + len(w.params)]
        first += len(w.params)
        if not _plain(w):
            reference.run_group(rule, w, norm, amp, mine)
            continue
        lr = _host_lr(w)
        if w.params and not _skipped(amp, w):
            c, scale = RULES[rule].constants(w.hyper), grad_scale(rule, w, norm, amp)
            firsts = [] if mine is None else [i for i, k in enumerate(torch.stack(w.steps).tolist()) if k == 0.0]
            gsnr, wide = _sai_gsnr(w, host, mine, firsts, scale, c)
            g = w.grads if scale is None else torch._foreach_mul(w.grads, float(scale))
            if c["momentum"] != 0.0:
                buf = w.state["momentum_buffer"]
                averaged, fed = buf, g
                if firsts:  # those buffers start as the first gradient; the others average
                    for i in firsts:
                        buf[i].copy_(g[i])
                    starting = set(firsts)
                    later = [i for i in range(len(buf)) if i not in starting]
                    averaged, fed = [buf[i] for i in later], [g[i] for i in later]
                if averaged:
                    torch._foreach_lerp_(averaged, fed, c["one_minus_momentum"])
                g = buf
            torch._foreach_mul_(w.params, 1.0 - lr * c["weight_decay"])
            # lr gsnr in float64, rounded to float32 for a float32 parameter, as the per-tensor form's 0-dim factor is
            steps = torch.tensor([lr * x for x in gsnr], dtype=torch.float64)
            steps = torch.where(wide, steps, steps.float().double()).neg_().tolist()
            # p - step b as p + (-step) b 1: one pass and no temporary list (step times b as a new list, then
            # subtracted, took 1.36 ms a step on cpu-small where this takes 0.99); bit for bit the per-tensor form's
            torch._foreach_addcmul_(w.params, g, [_ONE] * len(g), steps)
            _advance(w.steps, host)
        w.schedule_step.add_(1)


def _sai_gsnr(w: GroupWork, host: dict, sums: torch.Tensor | None, firsts: list[int], scale: torch.Tensor | None,
              c: dict) -> tuple[list[float], torch.Tensor]:
    """Each tensor's g-SNR as a host float, and which are kept in float64 (a float64 parameter's; the others in
    float32): measured from ``sums`` for the tensors at their first step (``firsts``) and written into the state,
    the others' read from it; kept in ``host`` for the selection's steps without sums."""
    key = ("sai", id(w.params))
    hit = host.get(key)
    if sums is None and hit is not None and hit[0] is w.params:
        return hit[1], hit[2]
    wide = torch.tensor([x.dtype == torch.float64 for x in w.scalars])
    gsnr = torch.stack([x.double() for x in w.scalars])
    if firsts:
        first = torch.zeros(len(w.params), dtype=torch.bool)
        first[firsts] = True
        gsnr = torch.where(first, snr.gsnr(sums, snr.applied(scale, wide), c["eps"]), gsnr)
        gsnr = torch.where(wide, gsnr, gsnr.float().double())  # as it is kept
        torch._foreach_copy_(w.scalars, list(gsnr.unbind()))
    host[key] = (w.params, gsnr.tolist(), wide)
    return host[key][1], wide


@dataclass
class _Part:
    """The parameters of one storage (their dtype, their state's, their codec) in a selection: one call of torch's
    (their positions, None for all)."""

    dtype: torch.dtype
    state_dtype: torch.dtype
    codec: str
    idx: list[int] | None
    walkable: list[bool]      # each dense, with its state laid out as it is
    past_first: bool = False  # every step count is past 1 (SGD's first step takes the gradient as its buffer)


def _run(rule: str, work: Sequence[GroupWork], host: dict, norm: torch.Tensor | None, amp: Amp | None,
         sums: torch.Tensor | None) -> None:
    spec = RULES[rule]
    first = 0
    for w in work:
        scale = grad_scale(rule, w, norm, amp)
        scale = 1.0 if scale is None else float(scale)  # CPU values: no sync
        # a rule that reads per-tensor norms (Rule.reduces): (||p||, ||g|| as applied or ||r||) per parameter, host
        # floats
        by = 1.0 if spec.reduces_direction else scale
        norms = None if sums is None else [(math.sqrt(a), math.sqrt(b) * by)
                                           for a, b in sums[first:first + len(w.params)].tolist()]
        first += len(w.params)
        lr = _host_lr(w)
        kept = host.pop(("lamb", id(w.params)), None)  # _reduce's directions and moments, for this step only
        if w.params and not _skipped(amp, w):
            _advance(w.steps, host)
            c = spec.constants(w.hyper)
            if kept is not None and kept[0] is w.params:  # float32 parameters and state: their directions applied
                _, r, m, v = kept
                torch._foreach_copy_(w.state["exp_avg"], m)
                torch._foreach_copy_(w.state["exp_avg_sq"], v)
                lamb_apply_foreach(w.params, r, lr, c, norms)
            else:
                _update_parts(rule, w, host, lr, c, scale, norms)
        w.schedule_step.add_(1)


def _update_parts(rule: str, w: GroupWork, host: dict, lr: float, c: dict, scale: float, norms: list | None) -> None:
    """Group ``w``'s update, one call of _update per storage (_parts)."""
    for part in _parts(w, host):
        pick = (lambda ts: ts) if part.idx is None else (lambda ts: [ts[i] for i in part.idx])
        p, g = pick(w.params), pick(w.grads)
        walkable = part.walkable if w.grads_like_params else [
            a and gi.stride() == pi.stride() for a, pi, gi in zip(part.walkable, p, g)]
        key = (int(w.hyper.get("seed", 0)), pick(w.slots), w.schedule_step, state_rounding_of(w.hyper))
        _update(rule, part, p, (pick(w.masters), pick(w.scales)), g, {n: pick(ts) for n, ts in w.state.items()},
                pick(w.steps), lr, c, walkable, scale, key, None if norms is None else pick(norms))


def _advance(steps: list[torch.Tensor], host: dict) -> None:
    """Every step count + 1: one op when they are the consecutive views of one vector that the optimizer
    makes for params that start together (FusedOptimizer._new_steps), else one foreach op."""
    key = ("steps", id(steps))
    hit = host.get(key)
    if hit is None or hit[0] is not steps:
        base = steps[0]._base if steps else None
        whole = base is not None and base.dim() == 1 and base.numel() == len(steps) and base.is_contiguous() and all(
            s._base is base and s.storage_offset() == base.storage_offset() + i for i, s in enumerate(steps))
        hit = host[key] = (steps, base if whole else None)
    if hit[1] is not None:
        hit[1].add_(1.0)
    else:
        torch._foreach_add_(steps, 1.0)


def _parts(w: GroupWork, host: dict) -> list[_Part]:
    """The group's parameters by storage, cached while the selection holds (its params list is the same object)."""
    key = ("parts", id(w.params))
    hit = host.get(key)
    if hit is None or hit[0] is not w.params:
        parts = []
        stored = [(p.dtype, next((ts[i].dtype for ts in w.state.values()), p.dtype), codec_of(w.hyper, p))
                  for i, p in enumerate(w.params)]
        storages = list(dict.fromkeys(stored))
        for dtype, state_dtype, codec in storages:
            idx = [i for i, triple in enumerate(stored) if triple == (dtype, state_dtype, codec)]
            parts.append(_Part(dtype, state_dtype, codec, None if len(storages) == 1 else idx,
                               [is_dense(w.params[i]) and all(ts[i].stride() == w.params[i].stride()
                                                              for ts in w.state.values()) for i in idx]))
        hit = host[key] = (w.params, parts)
    return hit[1]


def _walked_as_memory(p: list, g: list, s: dict[str, list], walkable: list[bool]) -> tuple[list, list, dict, Callable]:
    """torch's fused CPU kernels walk each tensor's memory linearly, as if its gradient and state were laid
    out as it is: a parameter with gaps, or a gradient laid out otherwise, goes in as contiguous copies;
    the returned ``done()`` writes the copied parameters and state back."""
    odd = [i for i, ok in enumerate(walkable) if not ok]
    if not odd:
        return p, g, s, lambda: None
    p2, g2, s2 = list(p), list(g), {n: list(ts) for n, ts in s.items()}
    for i in odd:
        p2[i], g2[i] = p[i].contiguous().clone(), g[i].contiguous()
        for n in s:
            s2[n][i] = s[n][i].contiguous().clone()

    def done() -> None:
        for i in odd:
            p[i].copy_(p2[i])
            for n in s:
                s[n][i].copy_(s2[n][i])

    return p2, g2, s2, done


def _update(rule: str, part: _Part, p: list, kept: tuple[list, list], g: list, s: dict[str, list], steps: list,
            lr: float, c: dict, walkable: list[bool], scale: float, key: tuple, norms: list | None) -> None:
    """One part's update, each gradient scaled by ``scale`` first (1 / GradScaler's scale times its group's clipping
    factor; 1: none). ``kept`` holds the parameters' master slots (registry.CODECS) and their 8-bit state's block
    scales (registry.QUANTIZED), ``key`` (seed, slots, t, state rounding) what keys stochastic rounding's random
    bits, ``norms`` each parameter's (||p||, ||g||) for a rule that reads them (Rule.reduces)."""
    seed, slots, t, rounds = key
    masters, scales = kept
    own_state = part.state_dtype == part.dtype
    narrow_state = part.state_dtype.itemsize < part.dtype.itemsize  # bfloat16 or 8-bit state of wider parameters
    rounded_state = part.state_dtype in _NARROW and rounds == "stochastic"
    if part.codec != "nearest" or narrow_state or rounded_state or part.dtype in _LOW and (
            rule not in _FUSED or not own_state or scale != 1.0 or not _fused_is_right(rule, part.dtype)):
        # compute in float32 (from the master where one is kept), round once on the way back (float32 state is
        # updated in place), in the parameter's layout (which torch's fused kernels take for the gradient's too)
        p32 = [decode(t, m, part.codec) for t, m in zip(p, masters)]
        p32 = [x if x.stride() == t.stride() else torch.empty_like(t, dtype=x.dtype).copy_(x) for x, t in zip(p32, p)]
        g32 = [t.float() for t in g]
        if scale != 1.0:
            torch._foreach_mul_(g32, scale)
        s32 = {n: [decode_state(t, a, rule, n) for t, a in zip(ts, scales)] for n, ts in s.items()}
        _compute(rule, part, p32, g32, s32, steps, lr, c, walkable, norms)
        if part.codec == "nearest":
            torch._foreach_copy_(p, p32)
        else:
            for dst, master, x, slot in zip(p, masters, p32, slots):
                new_p, new_master = encode(x, part.codec, part.dtype, seed, slot, t)
                dst.copy_(new_p)
                if new_master is not None:
                    master.copy_(new_master)
        if part.state_dtype in _NARROW:  # narrow state was updated in float32 copies: written back by its rounding
            for n, ts in s.items():
                if rounded_state or part.state_dtype == torch.int8:
                    j = RULES[rule].slot(n)[0]
                    for dst, absmax, x, slot in zip(ts, scales, s32[n], slots):
                        new_v, new_absmax = encode_state(x, rule, n, part.state_dtype, rounds, seed, slot, t)
                        dst.copy_(new_v)
                        if new_absmax is not None:
                            absmax[j].copy_(new_absmax)
                else:
                    torch._foreach_copy_(ts, s32[n])
    else:
        _compute(rule, part, p, g if scale == 1.0 else torch._foreach_mul(g, scale), s, steps, lr, c, walkable, norms)


def _compute(rule: str, part: _Part, p: list, g: list, s: dict[str, list], steps: list, lr: float,
             c: dict, walkable: list[bool], norms: list | None) -> None:
    if rule == "lars":  # its scaled gradients, then SGD's momentum and step in torch's fused kernel
        g, rule, c = lars_grads(p, g, lr, c, norms), "sgd", {**c, "weight_decay": 0.0}
    if rule in _FUSED:
        p, g, s, done = _walked_as_memory(p, g, s, walkable)
        _fused(rule, part, p, g, s, steps, lr, c)
        done()
    else:
        FOREACH[rule](p, g, s, torch.stack(steps).tolist(), lr, c, *([norms] if rule in READS_NORMS else []))


_PROBE = {"adamw": dict(beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8),
          "adagrad": dict(lr_decay=0.0, weight_decay=0.1, eps=1e-10),
          "sgd": dict(weight_decay=0.1, momentum=0.9, one_minus_dampening=0.8, nesterov=0.0)}


@functools.cache
def _fused_is_right(rule: str, dtype: torch.dtype) -> bool:
    """Whether torch's fused CPU kernel of ``rule`` updates parameters stored in ``dtype`` (16-bit) right, and may be
    handed them as they are; else they go to it as float32 copies. torch 2.11 to 2.13's SGD kernel left the
    vectorised blocks of a 16-bit parameter un-updated and wrote their momentum wrong, silently (pytorch#191763, fixed
    by pytorch#192545). Asked once per process: two steps on 67 elements (whole vectors and a tail on any SIMD width)
    against the same kernel on float32 copies, within 2 of the dtype's ulps at the largest value (rounding differs
    by under 1; each element's update is 25 or more, so one left un-updated is far outside)."""
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")  # (whatever torch's default device is)
    p32 = 1.0 + torch.rand(67, generator=gen, device=cpu)
    sign = torch.randn(67, generator=gen, device=cpu).sign()
    g32 = [(0.5 + torch.rand(67, generator=gen, device=cpu)) * sign for _ in range(2)]  # (|g| >= 0.5, one way twice)
    runs = []
    for d in (torch.float32, dtype):
        p = [p32.to(d, copy=True)]
        s = {n: [torch.zeros(67, dtype=d, device=cpu)] for n in ("exp_avg", "exp_avg_sq", "sum", "momentum_buffer")}
        steps = [torch.zeros((), device=cpu)]
        part = _Part(d, d, "nearest", None, [True])
        for g in g32:
            steps[0] += 1
            _fused(rule, part, p, [g.to(d, copy=True)], s, steps, 0.5, _PROBE[rule])
        runs.append(p[0].float())
    return bool((runs[0] - runs[1]).abs().max() <= 2 * torch.finfo(dtype).eps * runs[0].abs().max())


def _fused(rule: str, part: _Part, p: list, g: list, s: dict[str, list], steps: list, lr: float, c: dict) -> None:
    if rule == "adamw":
        torch._fused_adamw_(p, g, s["exp_avg"], s["exp_avg_sq"], [], steps, lr=lr, beta1=c["beta1"],
                            beta2=c["beta2"], weight_decay=c["weight_decay"], eps=c["eps"], amsgrad=False,
                            maximize=False)
        return
    if rule == "adagrad":  # its step counts were advanced already (_advance), as torch.optim advances them first
        torch._fused_adagrad_(p, g, s["sum"], steps, lr=lr, lr_decay=c["lr_decay"], weight_decay=c["weight_decay"],
                              eps=c["eps"], maximize=False)
        return
    bufs = s.get("momentum_buffer")
    if bufs is None or part.past_first:  # one call, no step counts to read
        calls = [(p, g, bufs or [], False)]
    else:  # torch's kernel takes one "first step" flag for its whole list: split on the counts (advanced)
        ks = torch.stack(steps).tolist()
        part.past_first = min(ks) > 1  # they only grow while the selection holds
        calls = []
        for first in (True, False):
            idx = [i for i, k in enumerate(ks) if (k == 1) == first]
            if idx:
                calls.append(([p[i] for i in idx], [g[i] for i in idx], [bufs[i] for i in idx], first))
    for p_, g_, b_, first in calls:
        torch._fused_sgd_(p_, g_, b_, weight_decay=c["weight_decay"], momentum=c["momentum"], lr=lr,
                          dampening=1.0 - c["one_minus_dampening"], nesterov=bool(c["nesterov"]), maximize=False,
                          is_first_step=first)
