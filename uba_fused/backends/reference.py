"""backend="torch": the update rules as readable per-tensor PyTorch.

This file is the specification the Triton and CUDA kernels mirror term by term,
the test oracle, and the fallback for any device. Element-wise math runs in
float32 (float64 for float64 parameters) whatever the storage dtype, as the
kernels do; per-step scalars (schedule factor, bias corrections) are float64
0-dim tensors on the parameters' device, so nothing here syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..registry import QBLOCK, RULES
from . import rounding, snr
from .projection import projection, row_sums, tensor_sums
from .cache import StepCache
from .work import Amp, GradSource, GroupWork, Step, codec_of, slots_of, state_rounding_of


def applied_lr(w: GroupWork) -> torch.Tensor:
    """lr(t) = group lr * factor(t), as a float64 0-dim tensor on the group's device."""
    lr = w.hyper["lr"]
    dev = w.schedule_step.device
    # torch.full, not torch.tensor: a fill on the device, where torch.tensor would copy from the host.
    if isinstance(lr, torch.Tensor):
        lr = lr.to(dev, torch.float64).reshape(())  # torch.optim takes a 1-element lr of any shape
    else:
        lr = torch.full((), lr, dtype=torch.float64, device=dev)
    if w.schedule is not None:
        lr = lr * w.schedule.factor_tensor(w.schedule_step)
    return lr


# Each rule: one step of one tensor. p, g and the state buffers s (by name) are in the compute dtype; step
# (1 on a parameter's first update) and lr are float64 0-dim tensors; c holds the rule's host constants
# (registry.Rule.constants: 1 - beta and the like, in float64, the same values every kernel reads).
def _adamw(p, g, s, step, lr, c):
    bc1 = 1.0 - c["beta1"] ** step
    bc2 = 1.0 - c["beta2"] ** step
    p.mul_(1.0 - lr * c["weight_decay"])
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.mul_(c["beta1"]).add_(g, alpha=c["one_minus_beta1"])
    v.mul_(c["beta2"]).addcmul_(g, g, value=c["one_minus_beta2"])
    denom = v.sqrt().div_(bc2.sqrt()).add_(c["eps"])
    p.sub_(m / denom * (lr / bc1))


def _adabelief(p, g, s, step, lr, c):
    # adabelief-pytorch 0.2: decoupled decay, eps added inside the variance, no rectification.
    bc1 = 1.0 - c["beta1"] ** step
    bc2 = 1.0 - c["beta2"] ** step
    p.mul_(1.0 - lr * c["weight_decay"])
    m, v = s["exp_avg"], s["exp_avg_var"]
    m.mul_(c["beta1"]).add_(g, alpha=c["one_minus_beta1"])
    r = g - m
    v.mul_(c["beta2"]).addcmul_(r, r, value=c["one_minus_beta2"]).add_(c["eps"])
    denom = v.sqrt().div_(bc2.sqrt()).add_(c["eps"])
    p.sub_(m / denom * (lr / bc1))


def _lion(p, g, s, step, lr, c):
    m = s["exp_avg"]
    u = m * c["beta1"] + g * c["one_minus_beta1"]
    p.mul_(1.0 - lr * c["weight_decay"])
    p.sub_(torch.sign(u) * lr)
    m.mul_(c["beta2"]).add_(g, alpha=c["one_minus_beta2"])


def _sgd(p, g, s, step, lr, c):
    # torch.optim.SGD: L2 decay into the gradient; the buffer starts as the first gradient.
    mom = c["momentum"]
    if c["weight_decay"] != 0.0:
        g = g + c["weight_decay"] * p
    if mom != 0.0:
        buf = s["momentum_buffer"]
        buf.copy_(torch.where(step == 1.0, g, buf * mom + g * c["one_minus_dampening"]))
        g = g + mom * buf if c["nesterov"] else buf
    p.sub_(g * lr)


def _adan(p, g, s, step, lr, c):
    # Adan (Xie et al., arXiv 2208.06677) as its PyTorch reference computes it (sail-sg/Adan): neg_pre_grad
    # holds minus the previous gradient, so g + neg_pre_grad is the gradient's change (0 on the first step).
    b1, b2, b3 = c["beta1"], c["beta2"], c["beta3"]
    m, n, d, neg_prev = s["exp_avg"], s["exp_avg_sq"], s["exp_avg_diff"], s["neg_pre_grad"]
    diff = torch.where(step == 1.0, torch.zeros_like(g), g + neg_prev)
    m.mul_(b1).add_(g, alpha=c["one_minus_beta1"])
    d.mul_(b2).add_(diff, alpha=c["one_minus_beta2"])
    u = g + b2 * diff
    n.mul_(b3).addcmul_(u, u, value=c["one_minus_beta3"])
    denom = n.sqrt().div_((1.0 - b3 ** step).sqrt()).add_(c["eps"])
    update = m / denom * (lr / (1.0 - b1 ** step)) + d / denom * (lr * b2 / (1.0 - b2 ** step))
    if c["no_prox"]:
        p.mul_(1.0 - lr * c["weight_decay"]).sub_(update)
    else:
        p.sub_(update).div_(1.0 + lr * c["weight_decay"])
    neg_prev.copy_(-g)


def _adagrad(p, g, s, step, lr, c):
    # torch.optim.Adagrad: L2 decay into the gradient, the lr decayed by the tensor's own step count.
    if c["weight_decay"] != 0.0:
        g = g + c["weight_decay"] * p
    clr = lr / (1.0 + (step - 1.0) * c["lr_decay"])
    acc = s["sum"]
    acc.addcmul_(g, g)
    p.sub_(g / acc.sqrt().add_(c["eps"]) * clr)


def _diffgrad(p, g, s, step, lr, c):
    # torch-optimizer's DiffGrad (Dubey et al. 2019): L2 decay into the gradient; the first moment scaled per element
    # by the friction 1 / (1 + exp(-|g_prev - g|)) (g_prev: the last gradient with its decay, 0 before the first);
    # eps outside the uncorrected square root, both bias corrections in the step size.
    if c["weight_decay"] != 0.0:
        g = g + c["weight_decay"] * p
    m, v, prev = s["exp_avg"], s["exp_avg_sq"], s["previous_grad"]
    m.mul_(c["beta1"]).add_(g, alpha=c["one_minus_beta1"])
    v.mul_(c["beta2"]).addcmul_(g, g, value=c["one_minus_beta2"])
    friction = 1.0 / (1.0 + torch.exp(-(prev - g).abs()))
    prev.copy_(g)
    step_size = lr * (1.0 - c["beta2"] ** step).sqrt() / (1.0 - c["beta1"] ** step)
    p.sub_(m * friction / v.sqrt().add_(c["eps"]) * step_size)


def _trust_ratio(w, gn, lr, c):
    """LARS's per-tensor factor (timm's Lars, apex's LARC) from the norms of the parameter (w) and of the gradient as
    the update applies it (gn), float64 0-dim tensors: 1 where either is 0, or where the group does not adapt."""
    if not c["adapt"]:
        return torch.ones((), dtype=torch.float64, device=w.device)
    ratio = c["trust_coeff"] * w / (gn + w * c["weight_decay"] + c["eps"])
    ratio = torch.where((w > 0) & (gn > 0), ratio, 1.0)
    return torch.clamp(ratio / lr, max=1.0) if c["trust_clip"] else ratio


def _lars(p, g, s, step, lr, c, norms):
    # timm's Lars: SGD on (g + wd p) times the trust ratio, not decoupled; norms = (||p||, ||g||) of the whole tensor.
    g = (g + c["weight_decay"] * p) * _trust_ratio(*norms, lr, c).to(g.dtype)
    _sgd(p, g, s, step, lr, {**c, "weight_decay": 0.0})


def _lamb_direction(p, g, s, step, c):
    """timm's Lamb's direction: Adam's moments (m takes beta3 g: 1 - beta1, or 1 without grad averaging), bias
    corrected (1 - exp(k log beta): log beta is -inf without bias correction), plus L2 decay. The moments are updated
    in s; r is a new tensor."""
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.mul_(c["beta1"]).add_(g, alpha=c["beta3"])
    v.mul_(c["beta2"]).addcmul_(g, g, value=c["one_minus_beta2"])
    bc1, bc2 = 1.0 - torch.exp(step * c["log_beta1"]), 1.0 - torch.exp(step * c["log_beta2"])
    denom = v.sqrt().div_(bc2.sqrt()).add_(c["eps"])
    return (m / denom * (1.0 / bc1)).add_(p, alpha=c["weight_decay"])


def _lamb(p, g, s, step, lr, c, norms):
    # timm's Lamb: the direction times the trust ratio ||p|| / ||r|| (1 where either is 0), clipped at 1 with
    # trust_clip (LAMBC), where the group decays or always adapts; norms = (||p||, ||r||) of the whole tensor.
    r = _lamb_direction(p, g, s, step, c)
    w, rn = norms
    ratio = torch.where((w > 0) & (rn > 0), w / rn, 1.0)
    if c["trust_clip"]:
        ratio = torch.clamp(ratio, max=1.0)
    p.sub_(r * (lr * (ratio if c["adapt"] else 1.0)))


def _adamp_direction(p, g, s, step, c):
    """The adamp package's AdamP direction: Adam's moments (updated in s), then m / (sqrt(v / bc2) + eps), or with
    nesterov (beta1 m + (1 - beta1) g) / (sqrt(v / bc2) + eps); the step divides it by bc1. A new tensor."""
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.mul_(c["beta1"]).add_(g, alpha=c["one_minus_beta1"])
    v.mul_(c["beta2"]).addcmul_(g, g, value=c["one_minus_beta2"])
    denom = v.sqrt().div_((1.0 - c["beta2"] ** step).sqrt()).add_(c["eps"])
    if c["nesterov"]:
        return (m * c["beta1"] + g * c["one_minus_beta1"]) / denom
    return m / denom


def _sgdp_direction(p, g, s, step, c):
    """The adamp package's SGDP direction: its momentum buffer (from 0, not from the first gradient as torch's SGD)
    b = momentum b + (1 - dampening) g, then b, or g + momentum b with nesterov. A new tensor."""
    buf = s["momentum_buffer"]
    buf.copy_(buf * c["momentum"] + g * c["one_minus_dampening"])
    return g + c["momentum"] * buf if c["nesterov"] else buf.clone()


def _project(p: torch.Tensor, d: torch.Tensor, c: dict, sums: torch.Tensor,
             g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor's projected direction d - a p and its decay factor, from its sums over all its shards (``sums``:
    tensor_sums's row) and its rows here."""
    rows, lengths, one = _one_tensor(p, g, d)
    coef, wdf = projection(sums.reshape(1, 6), rows, lengths, one * c["delta"], one * c["eps"], one * c["wd_ratio"],
                           torch.full((1,), p.dim() > 1, device=rows.device))
    shape = [-1] + [1] * (p.dim() - 1) if p.dim() > 1 else []
    return d - coef.reshape(shape).to(d.dtype) * p, wdf.reshape(())


def _adamp(p, g, s, step, lr, c, sums):
    # the adamp package's AdamP: Adam's direction projected (_project), the decoupled decay scaled by wd_ratio where
    # it is, the step lr / bc1
    u, wdf = _project(p, _adamp_direction(p, g, s, step, c), c, sums, g)
    p.mul_(1.0 - lr * c["weight_decay"] * wdf).sub_(u * (lr / (1.0 - c["beta1"] ** step)))


def _sgdp(p, g, s, step, lr, c, sums):
    # the adamp package's SGDP: its momentum projected (_project), the decoupled decay divided by 1 - momentum.
    # Without nesterov the direction is the buffer itself, which the package projects in place: the buffer keeps it.
    u, wdf = _project(p, _sgdp_direction(p, g, s, step, c), c, sums, g)
    if not c["nesterov"]:
        s["momentum_buffer"].copy_(u)
    p.mul_(1.0 - lr * c["weight_decay"] * wdf / (1.0 - c["momentum"])).sub_(u * lr)


def _sgd_sai(p, g, s, step, lr, c, gsnr):
    # the sgd-sai package's SGD_sai: the buffer starts as the first gradient, then momentum b + (1 - momentum) g (none
    # with momentum 0, where the package fails: the gradient itself); decoupled decay at lr; the step lr times the
    # tensor's g-SNR (``gsnr``, a 0-dim tensor, float32 but for a float64 parameter: measured at its first step, snr.py)
    if c["momentum"] != 0.0:
        buf = s["momentum_buffer"]
        buf.copy_(torch.where(step == 1.0, g, buf * c["momentum"] + g * c["one_minus_momentum"]))
        g = buf
    p.mul_(1.0 - lr * c["weight_decay"]).sub_(g * (lr * gsnr))


UPDATES = {"adamw": _adamw, "adabelief": _adabelief, "lion": _lion, "sgd": _sgd, "adan": _adan, "adagrad": _adagrad,
           "lars": _lars, "lamb": _lamb, "diffgrad": _diffgrad, "adamp": _adamp, "sgdp": _sgdp,
           "sgd_sai": _sgd_sai}
# the rules whose pre-pass reduces their update's direction ("update", PROJECTION)
DIRECTIONS = {"lamb": _lamb_direction, "adamp": _adamp_direction, "sgdp": _sgdp_direction}


def reduce_sums(rule: str, work: Sequence[GroupWork], norm: torch.Tensor | None, amp: Amp | None) -> torch.Tensor:
    """The per-tensor pre-pass (Rule.reduces): float64 [n, 2], per parameter of the groups in their order, the sums
    of squares of the parameter (as its codec reads it) and of its gradient (as backward left it) or of its update's
    direction (computed from copies of the state, from the gradient as the update applies it: clipped and unscaled
    by ``norm`` and ``amp``); for a rule that projects (Rule.projects), tensor_sums's [n, 6] of each."""
    ps = [p for w in work for p in w.params]
    if RULES[rule].measures:  # SGD-SaI's: each gradient's moments (snr.py), [n, 3]
        return snr.moments([g for w in work for g in w.grads], work[0].schedule_step.device)
    if not ps:
        width = 6 if RULES[rule].projects else 2
        return torch.zeros((0, width), dtype=torch.float64, device=work[0].schedule_step.device)
    if not RULES[rule].reduces_direction:
        gs = [g for w in work for g in w.grads]
        return torch.stack([torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)) for ts in (ps, gs)],
                           1).square()
    rows = []
    for w in work:
        scale, c = grad_scale(rule, w, norm, amp), RULES[rule].constants(w.hyper)
        for i, (p, g) in enumerate(zip(w.params, w.grads)):
            x = decode(p, w.masters[i], codec_of(w.hyper, p))
            g32 = _compute(g) if scale is None else _compute(g) * scale.to(g.device)
            s32 = {n: decode_state(ts[i], w.scales[i], rule, n).clone() for n, ts in w.state.items()}
            r = DIRECTIONS[rule](x, g32, s32, (w.steps[i] + 1.0).to(torch.float64), c)
            if RULES[rule].projects:
                rows.append(_tensor_sums(x, g32, r, c))
            else:
                rows.append(torch.stack([x.double().square().sum(), r.double().square().sum()]))
    return torch.stack(rows)


def _one_tensor(p: torch.Tensor, g: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One tensor's row_sums, as projection.py takes n tensors' (its count of rows: int64 [1]), and a float64 [1] 1."""
    rows = row_sums(p, g, d)
    return (rows, torch.full((1,), rows.shape[0], dtype=torch.int64, device=rows.device),
            torch.ones(1, dtype=torch.float64, device=rows.device))


def _tensor_sums(p: torch.Tensor, g: torch.Tensor, d: torch.Tensor, c: dict) -> torch.Tensor:
    """tensor_sums of one tensor, float64 [6]."""
    rows, lengths, one = _one_tensor(p, g, d)
    row_len = float(p.numel() // rows.shape[0]) if rows.shape[0] else 0.0
    return tensor_sums(rows, lengths, one * row_len, one * c["delta"], one * c["eps"])[0]


def grad_sumsq(work: Sequence[GroupWork], per_row: bool = False) -> torch.Tensor:
    """The pre-pass: the sum of the squares of the groups' gradients (in float64), a 0-dim tensor on their device;
    ``per_row``: each gradient's, float64 [n] (rows as reduce_sums's)."""
    grads = [g for w in work for g in w.grads]
    if not grads:
        return torch.zeros((0,) if per_row else (), dtype=torch.float64, device=work[0].schedule_step.device)
    rows = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square()
    return rows if per_row else rows.sum()


def grad_scale(rule: str, w: GroupWork, norm: torch.Tensor | None, amp: Amp | None = None) -> torch.Tensor | None:
    """The factor that multiplies the group's gradients, a float64 0-dim tensor (None: 1): 1 / GradScaler's scale
    (``amp.grad_scale``; 1 without one), times the clipping factor min(1, max_grad_norm / (norm / scale + eps))
    (Rule.clipping) of the unscaled gradients, as ``scaler.unscale_`` then ``clip_grad_norm_`` compute it."""
    max_norm, eps = RULES[rule].clipping(w.hyper)
    # 1 / scale in float32, as the kernels take it (exact for GradScaler's powers of two)
    inv = None if amp is None or amp.grad_scale is None else (1.0 / amp.grad_scale.reshape(()).float()).double()
    if norm is None or max_norm == 0:
        return inv
    clip = torch.clamp(max_norm / ((norm if inv is None else norm * inv.to(norm.device)) + eps), max=1.0)
    return clip if inv is None else clip * inv.to(clip.device)


def skipped(amp: Amp | None, device: torch.device) -> torch.Tensor | None:
    """A bool 0-dim tensor: GradScaler found an inf or NaN gradient (``amp.found_inf`` non-zero), so this step
    changes no parameter, state or step count; None without a scaler."""
    if amp is None or amp.found_inf is None:
        return None
    return amp.found_inf.reshape(()).to(device) != 0


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def decode(p: torch.Tensor, master: torch.Tensor | None, codec: str) -> torch.Tensor:
    """The value the update starts from (registry.CODECS, backends/rounding.py): the parameter (itself, if it is
    float32 or float64), or its master (exact, or 24 bits)."""
    if codec == "remainder":
        return rounding.master_join(p, master)
    if codec == "correction":
        return rounding.master8_join(p, master)
    if codec == "copy":
        ph = p.float()
        return torch.where(master.to(torch.float16).float() == ph, master, ph)
    return _compute(p)


def encode(x: torch.Tensor, codec: str, dtype: torch.dtype, seed: int, slot: int,
           t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the update's result ``x`` writes into a ``dtype`` parameter: (into the parameter, into its master or
    None). A float32 written into a 16-bit parameter rounds to nearest."""
    if codec == "remainder":
        return rounding.master_split(x)
    if codec == "copy":
        return x, x
    if codec == "correction":
        return rounding.master8_split(x, rounding.random_bits(x, seed, slot, t))
    if codec == "stochastic":
        return rounding.round_stochastic_to(x, rounding.random_bits(x, seed, slot, t), dtype), None
    return x, None


def decode_state(v: torch.Tensor, absmax: torch.Tensor | None, rule: str, name: str) -> torch.Tensor:
    """State buffer ``v`` (slot ``name`` of ``rule``) as the update reads it: in float32 (float64 for float64), from
    its 8-bit codes and the parameter's block scales ``absmax`` (rounding.dequantize) where it is int8."""
    if v.dtype == torch.int8:
        j, positive = RULES[rule].slot(name)
        return rounding.dequantize(v, absmax[j], positive, QBLOCK)
    return _compute(v)


def encode_state(x: torch.Tensor, rule: str, name: str, dtype: torch.dtype, how: str, seed: int, slot: int,
                 t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What state ``x`` (float32; slot ``name`` of ``rule``) writes into a ``dtype`` state buffer, with the block scales
    of 8-bit state (else None): 8-bit codes (rounding.quantize), 16 bits rounded stochastically, or ``x`` itself, which
    the buffer's copy rounds to nearest. ``how`` is the group's rounding (registry.STATE_ROUNDINGS); stochastic draws
    from random-bit stream 1 + j for slot j (rounding.random_bits)."""
    j, positive = RULES[rule].slot(name)
    narrow = dtype in (torch.bfloat16, torch.float16, torch.int8)
    r = rounding.random_bits(x, seed, slot, t, 1 + j) if how == "stochastic" and narrow else None
    if dtype == torch.int8:
        return rounding.quantize(x, positive, r, QBLOCK)
    return (x if r is None else rounding.round_stochastic_to(x, r, dtype)), None


def prepare(rule: str, work: Sequence[GroupWork], cache: StepCache, grads: GradSource | None) -> Step:
    return Step(lambda norm, amp, sums: _run(rule, work, norm, amp, sums),
                lambda per_row=False: grad_sumsq(work, per_row),  # (w.grads)
                lambda norm, amp: reduce_sums(rule, work, norm, amp), lambda: slots_of(work))


def _run(rule: str, work: Sequence[GroupWork], norm: torch.Tensor | None, amp: Amp | None,
         sums: torch.Tensor | None) -> None:
    first = 0
    for w in work:
        run_group(rule, w, norm, amp, None if sums is None else sums[first:first + len(w.params)])
        first += len(w.params)


def run_group(rule: str, w: GroupWork, norm: torch.Tensor | None, amp: Amp | None, sums: torch.Tensor | None) -> None:
    """One group's step: its lr, its update (``sums``: its rows of the per-tensor pre-pass's, or None where a rule
    that measures did not measure), its counter."""
    lr = applied_lr(w)
    w.lr_out.copy_(lr)
    _step_group(rule, w, lr, grad_scale(rule, w, norm, amp), skipped(amp, w.schedule_step.device), sums)
    w.schedule_step.add_(1)


def _step_group(rule: str, w: GroupWork, lr: torch.Tensor, scale: torch.Tensor | None,
                skip: torch.Tensor | None, sums: torch.Tensor | None = None) -> None:
    """The update of group ``w``'s parameters (each with its gradient), at ``lr``, their gradients multiplied by
    ``scale`` (None: 1), none of it written when ``skip`` holds (None: never). ``sums``: the per-tensor pre-pass's
    [n, 2] (reduce_sums), summed over shards, for a rule that reads it."""
    update, c, rounds = UPDATES[rule], RULES[rule].constants(w.hyper), state_rounding_of(w.hyper)
    for i in range(len(w.params)):
        p, g, step_t, master, absmax = w.params[i], w.grads[i], w.steps[i], w.masters[i], w.scales[i]
        stored = {name: tensors[i] for name, tensors in w.state.items()}
        codec = codec_of(w.hyper, p)
        x, s32 = decode(p, master, codec), {n: decode_state(v, absmax, rule, n) for n, v in stored.items()}
        if skip is not None:  # computed in copies, written back unless the step is skipped
            x = x.clone() if x is p else x
            s32 = {n: t.clone() if t is stored[n] else t for n, t in s32.items()}
        g32 = _compute(g)
        if scale is not None:
            g32 = g32 * scale.to(g32.device)
        k = step_t + 1.0
        gsnr = None
        if RULES[rule].measures:  # the tensor's g-SNR: measured at its first step (from sums), else the one it keeps
            gsnr = w.scalars[i].to(torch.float64)
            if sums is not None:
                fresh = snr.gsnr(sums[i], snr.applied(scale, g.dtype == torch.float64), c["eps"])  # (as g32 took it)
                gsnr = torch.where(k == 1.0, fresh, gsnr)
            gsnr = gsnr.to(w.scalars[i].dtype)  # float32 (float64 for a float64 parameter), as it is kept
            update(x, g32, s32, k.to(torch.float64), lr.to(x.device), c, gsnr.to(x.device))
        elif sums is None:
            update(x, g32, s32, k.to(torch.float64), lr.to(x.device), c)
        elif RULES[rule].projects:
            update(x, g32, s32, k.to(torch.float64), lr.to(x.device), c, sums[i])
        else:  # the norms of the parameter and of the gradient as applied (scaled, as g32), or of the direction
            gn = sums[i, 1].sqrt()
            if scale is not None and not RULES[rule].reduces_direction:
                gn = gn * scale.to(sums.device)
            update(x, g32, s32, k.to(torch.float64), lr.to(x.device), c, (sums[i, 0].sqrt(), gn))
        seed = int(w.hyper.get("seed", 0))
        new_p, new_master = encode(x, codec, p.dtype, seed, w.slots[i], w.schedule_step)
        writes = [(step_t, k), (p, new_p), (master, new_master), (None if gsnr is None else w.scalars[i], gsnr)]
        for n, v in stored.items():
            new_v, new_absmax = encode_state(s32[n], rule, n, v.dtype, rounds, seed, w.slots[i], w.schedule_step)
            writes += [(v, new_v), (None if new_absmax is None else absmax[RULES[rule].slot(n)[0]], new_absmax)]
        for dst, src in writes:
            if src is not None and src is not dst:
                dst.copy_(src if skip is None else torch.where(skip, dst, src))


# -- The same rules over lists of tensors (backend "cpu"): torch._foreach_ ops with host scalars -------------
# Term by term the functions above, one op over the whole list at a time, except that a moving average
# b * m + (1 - b) * x is one lerp, m + (1 - b) * (x - m): one pass over the list instead of two (each op streams
# the whole list through memory, which is what a CPU step costs). p, g and the state lists are in
# the compute dtype; ks holds each parameter's step count (1 on its first update); lr is a float. AdamW and
# SGD take torch's fused CPU kernels instead (backends/cpu.py), which compute torch.optim's own rule.
def _adabelief_foreach(p, g, s, ks, lr, c):
    m, v = s["exp_avg"], s["exp_avg_var"]
    torch._foreach_mul_(p, 1.0 - lr * c["weight_decay"])
    torch._foreach_lerp_(m, g, c["one_minus_beta1"])
    r = torch._foreach_sub(g, m)
    torch._foreach_mul_(v, c["beta2"])
    torch._foreach_addcmul_(v, r, r, value=c["one_minus_beta2"])
    torch._foreach_add_(v, c["eps"])
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1.0 - c["beta2"] ** k) for k in ks])
    torch._foreach_add_(denom, c["eps"])
    torch._foreach_addcdiv_(p, m, denom, [-lr / (1.0 - c["beta1"] ** k) for k in ks])


def _lion_foreach(p, g, s, ks, lr, c):
    m = s["exp_avg"]
    u = torch._foreach_lerp(m, g, c["one_minus_beta1"])
    torch._foreach_sign_(u)
    torch._foreach_mul_(p, 1.0 - lr * c["weight_decay"])
    torch._foreach_add_(p, u, alpha=-lr)
    torch._foreach_lerp_(m, g, c["one_minus_beta2"])


def _adan_foreach(p, g, s, ks, lr, c):
    b1, b2, b3 = c["beta1"], c["beta2"], c["beta3"]
    m, n, d, neg_prev = s["exp_avg"], s["exp_avg_sq"], s["exp_avg_diff"], s["neg_pre_grad"]
    for i in (i for i, k in enumerate(ks) if k == 1):  # a first step: no change of the gradient yet
        neg_prev[i].copy_(g[i]).neg_()
    diff = torch._foreach_add(g, neg_prev)
    torch._foreach_lerp_(m, g, c["one_minus_beta1"])
    torch._foreach_lerp_(d, diff, c["one_minus_beta2"])
    u = torch._foreach_add(g, diff, alpha=b2)
    torch._foreach_mul_(n, b3)
    torch._foreach_addcmul_(n, u, u, value=c["one_minus_beta3"])
    denom = torch._foreach_sqrt(n)
    torch._foreach_div_(denom, [math.sqrt(1.0 - b3 ** k) for k in ks])
    torch._foreach_add_(denom, c["eps"])
    if c["no_prox"]:
        torch._foreach_mul_(p, 1.0 - lr * c["weight_decay"])
    torch._foreach_addcdiv_(p, m, denom, [-lr / (1.0 - b1 ** k) for k in ks])
    torch._foreach_addcdiv_(p, d, denom, [-lr * b2 / (1.0 - b2 ** k) for k in ks])
    if not c["no_prox"]:
        torch._foreach_div_(p, 1.0 + lr * c["weight_decay"])
    torch._foreach_copy_(neg_prev, g)
    torch._foreach_neg_(neg_prev)


def _trust_ratio_host(w: float, gn: float, lr: float, c: dict) -> float:
    """_trust_ratio in Python floats (the same float64 operations), for norms already on the host."""
    if not c["adapt"]:
        return 1.0
    ratio = c["trust_coeff"] * w / (gn + w * c["weight_decay"] + c["eps"]) if w > 0 and gn > 0 else 1.0
    if c["trust_clip"]:
        ratio = min(ratio / lr, 1.0) if lr > 0 else (1.0 if ratio > 0 else math.nan)  # ratio / 0: inf, or nan
    return ratio


def _diffgrad_foreach(p, g, s, ks, lr, c):
    if c["weight_decay"] != 0.0:
        g = torch._foreach_add(g, p, alpha=c["weight_decay"])
    m, v, prev = s["exp_avg"], s["exp_avg_sq"], s["previous_grad"]
    torch._foreach_lerp_(m, g, c["one_minus_beta1"])
    torch._foreach_mul_(v, c["beta2"])
    torch._foreach_addcmul_(v, g, g, value=c["one_minus_beta2"])
    friction = torch._foreach_sub(prev, g)
    torch._foreach_abs_(friction)
    torch._foreach_neg_(friction)
    torch._foreach_exp_(friction)
    torch._foreach_add_(friction, 1.0)
    torch._foreach_reciprocal_(friction)
    torch._foreach_copy_(prev, g)
    torch._foreach_mul_(friction, m)
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, c["eps"])
    torch._foreach_addcdiv_(p, friction, denom,
                            [-lr * math.sqrt(1.0 - c["beta2"] ** k) / (1.0 - c["beta1"] ** k) for k in ks])


def lamb_direction_foreach(p, g, m, v, ks, c, scale=1.0):
    """_lamb_direction over lists, of the gradients g times ``scale`` (folded into the moments' factors: one pass and
    one list fewer), the moments m and v left as they are: (the directions, the new moments), new tensors."""
    m = torch._foreach_mul(m, c["beta1"])
    torch._foreach_add_(m, g, alpha=c["beta3"] * scale)
    v = torch._foreach_mul(v, c["beta2"])
    torch._foreach_addcmul_(v, g, g, value=c["one_minus_beta2"] * scale * scale)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1.0 - math.exp(k * c["log_beta2"])) for k in ks])
    torch._foreach_add_(denom, c["eps"])
    r = torch._foreach_div(m, denom)
    torch._foreach_mul_(r, [1.0 / (1.0 - math.exp(k * c["log_beta1"])) for k in ks])
    if c["weight_decay"] != 0.0:
        torch._foreach_add_(r, p, alpha=c["weight_decay"])
    return r, m, v


def lamb_apply_foreach(p, r, lr, c, norms):
    """_lamb's step over lists, from the directions r (scaled in place) and each tensor's (||p||, ||r||) as host
    floats (CPU parameters)."""
    ratios = [1.0] * len(p)
    if c["adapt"]:
        ratios = [w / rn if w > 0 and rn > 0 else 1.0 for w, rn in norms]
        ratios = [min(x, 1.0) for x in ratios] if c["trust_clip"] else ratios
    torch._foreach_mul_(r, [-lr * x for x in ratios])
    torch._foreach_add_(p, r)


def _lamb_foreach(p, g, s, ks, lr, c, norms):
    r, m, v = lamb_direction_foreach(p, g, s["exp_avg"], s["exp_avg_sq"], ks, c)
    torch._foreach_copy_(s["exp_avg"], m)
    torch._foreach_copy_(s["exp_avg_sq"], v)
    lamb_apply_foreach(p, r, lr, c, norms)


def lars_grads(p, g, lr, c, norms):
    """LARS's gradients over lists (backend "cpu"), (g + wd p) times each tensor's trust ratio, new tensors: the rest of
    the rule is SGD's with momentum, which torch's fused CPU kernel runs. The ratios are computed on the host (CPU
    parameters: their norms are host floats), as _trust_ratio computes them, and rounded to the compute dtype as the
    per-tensor form rounds them (one tensor for them all: one per ratio cost 40 us each)."""
    wide = [_trust_ratio_host(w, gn, lr, c) for w, gn in norms]
    narrow = torch.tensor(wide, dtype=torch.float64).float().tolist()
    ratios = [a if t.dtype == torch.float64 else b for a, b, t in zip(wide, narrow, g)]
    g = torch._foreach_add(g, p, alpha=c["weight_decay"]) if c["weight_decay"] != 0.0 else [t.clone() for t in g]
    torch._foreach_mul_(g, ratios)
    return g


def projecting_directions_foreach(rule, p, g, s, ks, c):
    """_adamp_direction or _sgdp_direction over lists, the state left as it is: (the directions, the new state by
    name), new tensors (SGDP without nesterov: its direction is its new buffer, the same tensors)."""
    if rule == "adamp":
        m = torch._foreach_mul(s["exp_avg"], c["beta1"])
        torch._foreach_add_(m, g, alpha=c["one_minus_beta1"])
        v = torch._foreach_mul(s["exp_avg_sq"], c["beta2"])
        torch._foreach_addcmul_(v, g, g, value=c["one_minus_beta2"])
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1.0 - c["beta2"] ** k) for k in ks])
        torch._foreach_add_(denom, c["eps"])
        num = m
        if c["nesterov"]:
            num = torch._foreach_mul(m, c["beta1"])
            torch._foreach_add_(num, g, alpha=c["one_minus_beta1"])
        return torch._foreach_div(num, denom), {"exp_avg": m, "exp_avg_sq": v}
    b = torch._foreach_mul(s["momentum_buffer"], c["momentum"])
    torch._foreach_add_(b, g, alpha=c["one_minus_dampening"])
    return (torch._foreach_add(g, b, alpha=c["momentum"]) if c["nesterov"] else b), {"momentum_buffer": b}


def list_row_sums(p, g, d) -> torch.Tensor:
    """row_sums of the tensors of 2 dims or more among p (none of the others, never projected), one after another:
    float64 [rows, 4], from float32 products added in float64 (backend "cpu"; row_sums multiplies in float64)."""
    out = []
    for x, y, z in zip(p, g, d):
        if x.dim() > 1 and x.numel():
            x, y, z = (t.reshape(x.shape[0], -1) for t in (x, y, z))
            out.append(torch.stack([torch.sum(a * b, 1, dtype=torch.float64) for a, b in ((x, x), (y, y), (x, y),
                                                                                         (x, z))], 1))
    return torch.cat(out) if out else torch.zeros((0, 4), dtype=torch.float64)


def projecting_apply_foreach(rule, p, d, s, new, ks, lr, c, coefs, factors):
    """_adamp's or _sgdp's step over lists, from the directions d (projected in place by each row's coefficient,
    ``coefs``: per tensor a float64 [rows] tensor, 0 where it is not projected, or None for one of under 2 dims) and
    the new state ``new`` (copied into s), each tensor's decay factor a host float (``factors``)."""
    for x, u, a in zip(p, d, coefs):
        if a is not None:
            u.sub_(a.to(u.dtype).reshape([-1] + [1] * (x.dim() - 1)) * x)
    if rule == "sgdp" and not c["nesterov"]:
        new = {"momentum_buffer": d}  # the package projects the buffer in place
    for n, ts in new.items():
        torch._foreach_copy_(s[n], ts)
    if rule == "adamp":
        torch._foreach_mul_(p, [1.0 - lr * c["weight_decay"] * f for f in factors])
        torch._foreach_mul_(d, [-lr / (1.0 - c["beta1"] ** k) for k in ks])
    else:
        torch._foreach_mul_(p, [1.0 - lr * c["weight_decay"] * f / (1.0 - c["momentum"]) for f in factors])
        d = torch._foreach_mul(d, -lr)
    torch._foreach_add_(p, d)


FOREACH = {"adabelief": _adabelief_foreach, "lion": _lion_foreach, "adan": _adan_foreach, "lamb": _lamb_foreach,
           "diffgrad": _diffgrad_foreach}
READS_NORMS = ("lamb",)  # the list forms that take each tensor's (||p||, ||r||)
