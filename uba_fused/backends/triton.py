"""backend="triton": one launch per step (per storage: parameter dtype and state dtype) over the whole
parameter list.

Each program takes one work item (tensor row, first element) of the plan (backends/plan.py), reads
the tensor's addresses and its group's hyper-parameters from device tables, computes the group's
learning rate from the device step counter (the formulas of schedules.py, in float32; bias
corrections in float64), and updates BLOCK elements, one sub-tile at a time. The math mirrors
backends/reference.py term by term.

Counters are advanced by the kernel itself, without a second launch: each program counts its chunk
done with an atomic; the last chunk of a tensor writes the tensor's new step, and the last tensor
of the launch advances every group's ``schedule_step`` and writes the applied lr to ``lr_out``.
Every program reads the counters before its atomic, so none sees a value written in this step.

Speed notes (H100 probes in shared/anchors): loads through a pointer read from memory vectorize
only when the compiler is told it is 16-byte aligned (0.75 -> 0.98 of copy bandwidth), and a mask
on every chunk costs vectorization too; so aligned tensors take a hinted path, full chunks an
unmasked one, and only a tensor's last chunk (or a misaligned tensor) pays for either. Sub-tiles
keep the registers a thread needs bounded (see VECTOR_BYTES).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..registry import (CHUNK, CODECS, GROUP_ADDRESSES, GROUP_COLS, KIND, NO_GRAD, QBLOCK, RULES, STATE_COL, TENSOR_COLS,
                        group_cols)
from .plan import Part, Plan
from .cache import StepCache
from .work import Amp, GradSource, GroupWork, Step

BLOCK = CHUNK     # elements per program; 4K-16K all reached 0.96-0.99 of copy bandwidth in the probes
NUM_WARPS = 4
# A program walks its chunk in sub-tiles: on the vector path (aligned full chunks) one 16-byte vector per
# thread and tensor (512 fp32 or 1024 bf16 elements with 4 warps), as the CUDA kernel's loop does; on
# the scalar paths (a tensor's last chunk, a misaligned tensor) 4 elements per thread, since each scalar
# access holds its own 64-bit address. The whole chunk at once kept 32 elements of each of 4 tensors per
# thread live: ptxas (sm_90) gave 255 registers and spilled 532 bytes per thread (AdamW fp32; 688 in
# bf16), and on an H100 bf16 reached only 0.70-0.74 of copy bandwidth. Sub-tiles of one vector on every
# path still took 95 registers in bf16 (128 with triton 3.6's ptxas), all of it on the scalar paths;
# now 40-64 registers in AdamW, Lion and SGD. tests/test_triton_codegen.py keeps the bounds.
VECTOR_BYTES = 16
# Float32 math rounds each product and each sum on its own, as the CUDA kernel's (built with -fmad=false) and the
# host build's: contracting a * b + c into one FMA, which Triton and nvcc each do where they choose, made the two
# kernels' parameters differ in the last bit on a GPU (645 of 12,288 in fp32 AdamW, H200, 2026-12-04), and 8-bit
# codes then flip. Divisions are IEEE's (_div) for the same reason.
FP_FUSION = False
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_SCALAR_SUB = tl.constexpr(4 * 32 * NUM_WARPS)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.int8: tl.int8}

# The registry's numbers as compile-time constants, looked up by name (a name it lacks raises here).
_NO_GRAD = tl.constexpr(NO_GRAD)
_QBLOCK = tl.constexpr(QBLOCK)
assert (4 * 32 * NUM_WARPS) % QBLOCK == 0 == VECTOR_BYTES * 32 * NUM_WARPS // 4 % QBLOCK, "whole blocks per sub-tile"
_STATE0 = tl.constexpr(STATE_COL)
_PARAM, _GRAD_SLOT, _STEP, _NUMEL, _GROUP, _INFO, _MASTER, _ABSMAX, _SCALAR = (
    tl.constexpr(TENSOR_COLS.index(c)) for c in ("param", "grad_slot", "step", "numel", "group", "info", "master",
                                                 "absmax", "scalar"))
_LR, _KIND, _WARMUP, _TOTAL, _MINR, _PHI, _HAS_STATE, _MAX_GRAD_NORM, _CLIP_EPS, _SEED = (
    tl.constexpr(GROUP_COLS.index(c)) for c in ("lr", "kind", "warmup", "total", "min_ratio", "phi", "has_state",
                                                 "max_grad_norm", "clip_eps", "seed"))
_NEAREST, _REMAINDER, _COPY, _STOCHASTIC, _CORRECTION = (
    tl.constexpr(CODECS.index(c)) for c in ("nearest", "remainder", "copy", "stochastic", "correction"))
_UBA, _COSINE, _LINEAR, _REX, _CONSTANT, _TABLE = (
    tl.constexpr(KIND[k]) for k in ("uba", "cosine", "linear", "rex", "constant", "table"))
_COUNTER_ADDRESS, _LR_OUT_ADDRESS, _TABLE_ADDRESS = (
    tl.constexpr(GROUP_ADDRESSES.index(c)) for c in ("counter", "lr_out", "table"))
_GROUP_ADDRESSES = tl.constexpr(len(GROUP_ADDRESSES))
_ADAMW, _ADABELIEF, _LION, _SGD, _ADAN, _ADAGRAD, _LARS, _LAMB, _DIFFGRAD, _ADAMP, _SGDP, _SGD_SAI = (
    tl.constexpr(RULES[r].id) for r in ("adamw", "adabelief", "lion", "sgd", "adan", "adagrad", "lars", "lamb",
                                        "diffgrad", "adamp", "sgdp", "sgd_sai"))


def _cols(rule: str, *names: str) -> tuple:
    cols = group_cols(rule)
    return tuple(tl.constexpr(cols.index(n)) for n in names)


_ADAM_COLS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2", "eps", "weight_decay")
assert _cols("adamw", *_ADAM_COLS) == _cols("adabelief", *_ADAM_COLS) == _cols("diffgrad", *_ADAM_COLS), \
    "AdamW, AdaBelief and DiffGrad share their columns"
_A_B1, _A_B2, _A_OMB1, _A_OMB2, _A_LOGB1, _A_LOGB2, _A_EPS, _A_WD = _cols("adamw", *_ADAM_COLS)
_L_B1, _L_B2, _L_OMB1, _L_OMB2, _L_WD = _cols("lion", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2",
                                              "weight_decay")
_S_MOM, _S_OMDAMP, _S_NESTEROV, _S_WD = _cols("sgd", "momentum", "one_minus_dampening", "nesterov", "weight_decay")
(_N_B1, _N_B2, _N_B3, _N_OMB1, _N_OMB2, _N_OMB3, _N_LOGB1, _N_LOGB2, _N_LOGB3, _N_EPS, _N_WD, _N_NO_PROX) = _cols(
    "adan", "beta1", "beta2", "beta3", "one_minus_beta1", "one_minus_beta2", "one_minus_beta3", "log_beta1",
    "log_beta2", "log_beta3", "eps", "weight_decay", "no_prox")
_G_LR_DECAY, _G_EPS, _G_WD = _cols("adagrad", "lr_decay", "eps", "weight_decay")
(_R_MOM, _R_OMDAMP, _R_NESTEROV, _R_WD, _R_TRUST, _R_EPS, _R_CLIP, _R_ADAPT) = _cols(
    "lars", "momentum", "one_minus_dampening", "nesterov", "weight_decay", "trust_coeff", "eps", "trust_clip", "adapt")
(_B_B1, _B_B2, _B_B3, _B_OMB2, _B_LOGB1, _B_LOGB2, _B_EPS, _B_WD, _B_CLIP, _B_ADAPT) = _cols(
    "lamb", "beta1", "beta2", "beta3", "one_minus_beta2", "log_beta1", "log_beta2", "eps", "weight_decay",
    "trust_clip", "adapt")
assert _cols("adamp", *_ADAM_COLS) == _cols("adamw", *_ADAM_COLS), "AdamP shares Adam's columns"
_P_NESTEROV, = _cols("adamp", "nesterov")
_Q_MOM, _Q_OMDAMP, _Q_NESTEROV, _Q_WD = _cols("sgdp", "momentum", "one_minus_dampening", "nesterov", "weight_decay")
_I_MOM, _I_OMM, _I_EPS, _I_WD = _cols("sgd_sai", "momentum", "one_minus_momentum", "eps", "weight_decay")


@triton.jit
def _div(a, b):
    """a / b in float32, rounded as IEEE divides (CUDA's ``/``); Triton's ``/`` is an approximate division, off by up
    to 2 units in the last place, which made the two kernels' bits differ on a GPU. Under TRITON_INTERPRET both are
    numpy's division, and ``/`` skips div_rn's checks (with them test_kernels.py took 472 s against 419 before, run
    side by side on 2 cores)."""
    if _INTERPRETED:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def _neg(x):
    """-x by its sign bit, as CUDA's: -0.0 for 0.0 (some Triton versions compile -x as 0 - x, which gives 0.0)."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def _schedule_factor(t, kind, warmup, total, min_ratio, phi):
    """factor(t) of schedules.py in float32 (csrc/schedules.cuh is the same function; an unknown kind: NaN)."""
    p = tl.minimum(tl.maximum(_div(t - warmup, tl.maximum(total - warmup, 1.0)), 0.0), 1.0)  # T - W >= 1
    c = 1.0 + tl.cos(3.141592653589793 * p)
    shape = tl.where(kind == _UBA, _div(2.0 * c, 2.0 * phi + (2.0 - phi) * c),
                     tl.where(kind == _COSINE, 0.5 * c,
                              tl.where(kind == _LINEAR, 1.0 - p,
                                       tl.where(kind == _REX, _div(1.0 - p, 1.0 - 0.5 * p), float("nan")))))
    decay = tl.where(kind == _CONSTANT, 1.0, min_ratio + (1.0 - min_ratio) * shape)
    return tl.where(t < warmup, _div(t + 1.0, tl.maximum(warmup, 1.0)), decay)


@triton.jit
def _group_lr(groups, gaddr, gi, mask, NG: tl.constexpr, TABLES: tl.constexpr):
    """The lr of group(s) gi (where ``mask``; None: a scalar gi) for this step, with the address(es) of their step
    counters. TABLES (some group's schedule is a Table): a Table's factor is its table's at min(t, total - 1)
    (csrc/updates.cuh: group_lr); compiled only where a plan has one, so that the other kernels are as they were."""
    row = groups + gi * NG
    counter = tl.load(gaddr + _GROUP_ADDRESSES * gi + _COUNTER_ADDRESS, mask=mask).to(tl.pointer_type(tl.int64))
    step = tl.load(counter, mask=mask)
    kind = tl.load(row + _KIND, mask=mask).to(tl.float32)
    f = _schedule_factor(step.to(tl.float32), kind, tl.load(row + _WARMUP, mask=mask).to(tl.float32),
                         tl.load(row + _TOTAL, mask=mask).to(tl.float32),
                         tl.load(row + _MINR, mask=mask).to(tl.float32), tl.load(row + _PHI, mask=mask).to(tl.float32))
    if TABLES:
        if mask is None:
            tabled = kind == _TABLE
        else:
            tabled = mask & (kind == _TABLE)
        table = tl.load(gaddr + _GROUP_ADDRESSES * gi + _TABLE_ADDRESS, mask=tabled).to(tl.pointer_type(tl.float32))
        last = tl.load(row + _TOTAL, mask=tabled).to(tl.int64) - 1
        f = tl.where(tabled, tl.load(table + tl.minimum(step, last), mask=tabled), f)
    return tl.load(row + _LR, mask=mask).to(tl.float32) * f, counter


@triton.jit
def _f32(row, col):
    return tl.load(row + col).to(tl.float32)


@triton.jit
def _bias_correction(row, log_beta, k):
    """1 - b^k in float64, from log b: one exp, however large k."""
    return 1.0 - tl.exp(k.to(tl.float64) * tl.load(row + log_beta))


# Each rule (csrc/updates.cuh: one functor per rule): its scalars, loaded once per program from the group
# row, the lr and the tensor's step count k after this update; and its update of float32 blocks, p the
# parameter, g the gradient, s0..s3 the state slots in registry.py's order (slots a rule lacks pass through).
@triton.jit
def _adam_scalars(row, k, lr):
    step_size = (lr.to(tl.float64) / _bias_correction(row, _A_LOGB1, k)).to(tl.float32)
    sqrt_bc2 = tl.sqrt(_bias_correction(row, _A_LOGB2, k)).to(tl.float32)
    return (1.0 - lr * _f32(row, _A_WD), _f32(row, _A_B1), _f32(row, _A_OMB1), _f32(row, _A_B2), _f32(row, _A_OMB2),
            _f32(row, _A_EPS), step_size, sqrt_bc2)


@triton.jit
def _adamw(p, g, m, v, c):
    decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2 = c
    p = p * decay
    m = m * b1 + g * omb1
    v = v * b2 + g * g * omb2
    p = p - _div(m, _div(tl.sqrt_rn(v), sqrt_bc2) + eps) * step_size
    return p, m, v


@triton.jit
def _adabelief(p, g, m, v, c):
    decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2 = c
    p = p * decay
    m = m * b1 + g * omb1
    r = g - m
    v = v * b2 + r * r * omb2 + eps
    p = p - _div(m, _div(tl.sqrt_rn(v), sqrt_bc2) + eps) * step_size
    return p, m, v


@triton.jit
def _exp(x):
    """exp in float32 as the CUDA kernel's expf computes it: libdevice's (tl.exp is ex2.approx of x log2(e)); the
    interpreter has no libdevice."""
    if _INTERPRETED:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def _diffgrad_scalars(row, k, lr):
    step_size = (lr.to(tl.float64) * tl.sqrt(_bias_correction(row, _A_LOGB2, k)) /
                 _bias_correction(row, _A_LOGB1, k)).to(tl.float32)
    return (_f32(row, _A_WD), _f32(row, _A_B1), _f32(row, _A_OMB1), _f32(row, _A_B2), _f32(row, _A_OMB2),
            _f32(row, _A_EPS), step_size)


@triton.jit
def _diffgrad(p, g, m, v, prev, c):
    """torch-optimizer's DiffGrad: L2 decay into g, the first moment times the friction of |g_prev - g|."""
    wd, b1, omb1, b2, omb2, eps, step_size = c
    g = g + wd * p
    m = m * b1 + g * omb1
    v = v * b2 + g * g * omb2
    friction = _div(tl.full(g.shape, 1.0, tl.float32), 1.0 + _exp(_neg(tl.abs(prev - g))))
    p = p - _div(m * friction, tl.sqrt_rn(v) + eps) * step_size
    return p, m, v, g


@triton.jit
def _lion_scalars(row, k, lr):
    return lr, 1.0 - lr * _f32(row, _L_WD), _f32(row, _L_B1), _f32(row, _L_OMB1), _f32(row, _L_B2), _f32(row, _L_OMB2)


@triton.jit
def _lion(p, g, m, c):
    lr, decay, b1, omb1, b2, omb2 = c
    u = m * b1 + g * omb1
    sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    p = p * decay - sign * lr
    m = m * b2 + g * omb2
    return p, m


@triton.jit
def _sgd_scalars(row, k, lr):
    return lr, _f32(row, _S_WD), _f32(row, _S_MOM), _f32(row, _S_OMDAMP), tl.load(row + _S_NESTEROV) != 0.0, k == 1.0


@triton.jit
def _sgd(p, g, buf, c):
    """torch.optim.SGD: L2 decay into the gradient; the buffer starts as the first gradient."""
    lr, wd, mom, omdamp, nesterov, first = c
    g = g + wd * p
    if mom != 0.0:  # momentum 0 keeps no buffer (the group's has_state is 0)
        buf = tl.where(first, g, buf * mom + g * omdamp)
        if nesterov:
            g = g + mom * buf
        else:
            g = buf
    p = p - g * lr
    return p, buf


@triton.jit
def _adan_scalars(row, k, lr):
    lr64 = lr.to(tl.float64)
    step_size = (lr64 / _bias_correction(row, _N_LOGB1, k)).to(tl.float32)
    step_size_diff = (lr64 * tl.load(row + _N_B2) / _bias_correction(row, _N_LOGB2, k)).to(tl.float32)
    sqrt_bc3 = tl.sqrt(_bias_correction(row, _N_LOGB3, k)).to(tl.float32)
    return (lr, _f32(row, _N_WD), _f32(row, _N_B1), _f32(row, _N_OMB1), _f32(row, _N_B2), _f32(row, _N_OMB2),
            _f32(row, _N_B3), _f32(row, _N_OMB3), _f32(row, _N_EPS), step_size, step_size_diff, sqrt_bc3,
            tl.load(row + _N_NO_PROX) != 0.0, k == 1.0)


@triton.jit
def _adan(p, g, m, n, d, neg_prev, c):
    """Adan's PyTorch reference (sail-sg/Adan): neg_prev is minus the previous gradient."""
    lr, wd, b1, omb1, b2, omb2, b3, omb3, eps, step_size, step_size_diff, sqrt_bc3, no_prox, first = c
    diff = tl.where(first, 0.0, g + neg_prev)
    m = m * b1 + g * omb1
    d = d * b2 + diff * omb2
    u = g + b2 * diff
    n = n * b3 + u * u * omb3
    denom = _div(tl.sqrt_rn(n), sqrt_bc3) + eps
    if no_prox:
        p = p * (1.0 - lr * wd) - _div(m, denom) * step_size - _div(d, denom) * step_size_diff
    else:
        p = _div(p - _div(m, denom) * step_size - _div(d, denom) * step_size_diff, 1.0 + lr * wd)
    return p, m, n, d, _neg(g)


@triton.jit
def _adagrad_scalars(row, k, lr):
    clr = (lr.to(tl.float64) / (1.0 + (k.to(tl.float64) - 1.0) * tl.load(row + _G_LR_DECAY))).to(tl.float32)
    return clr, _f32(row, _G_WD), _f32(row, _G_EPS)


@triton.jit
def _adagrad(p, g, acc, c):
    """torch.optim.Adagrad: L2 decay into the gradient, lr decayed by the step count (clr)."""
    clr, wd, eps = c
    g = g + wd * p
    acc = acc + g * g
    p = p - _div(g, tl.sqrt_rn(acc) + eps) * clr
    return p, acc


@triton.jit
def _lars_scalars(row, k, lr, red, gscale):
    """SGD's scalars and the trust ratio (reference.py: _trust_ratio), in float64 from the tensor's sums of squares
    ``red`` (the parameter's, the gradient's: the pre-pass's, summed over shards), the gradient's norm scaled as the
    update applies it (gscale)."""
    w = tl.sqrt(tl.load(red))
    gn = tl.sqrt(tl.load(red + 1)) * gscale.to(tl.float64)
    ratio = tl.load(row + _R_TRUST) * w / (gn + w * tl.load(row + _R_WD) + tl.load(row + _R_EPS))
    ratio = tl.where((w > 0.0) & (gn > 0.0), ratio, 1.0)
    ratio = tl.where(tl.load(row + _R_CLIP) != 0.0, tl.minimum(ratio / lr.to(tl.float64), 1.0), ratio)
    ratio = tl.where(tl.load(row + _R_ADAPT) != 0.0, ratio, 1.0)
    return (lr, _f32(row, _R_WD), _f32(row, _R_MOM), _f32(row, _R_OMDAMP), tl.load(row + _R_NESTEROV) != 0.0,
            k == 1.0, ratio.to(tl.float32))


@triton.jit
def _lars(p, g, buf, c):
    """timm's Lars: SGD with momentum on (g + wd p) times the tensor's trust ratio."""
    lr, wd, mom, omdamp, nesterov, first, ratio = c
    return _sgd(p, (g + wd * p) * ratio, buf, (lr, 0.0, mom, omdamp, nesterov, first))


@triton.jit
def _lamb_scalars(row, k, lr, red, REDUCE: tl.constexpr):
    """Adam's scalars, and lr times the trust ratio ||p|| / ||r|| (reference.py: _lamb) in float64 from the tensor's
    sums of squares ``red`` (the pre-pass's, summed over shards); the pre-pass itself (REDUCE) applies nothing."""
    step = lr.to(tl.float64)
    if not REDUCE:
        w, rn = tl.sqrt(tl.load(red)), tl.sqrt(tl.load(red + 1))
        ratio = tl.where((w > 0.0) & (rn > 0.0), w / tl.where(rn > 0.0, rn, 1.0), 1.0)  # (no 0 / 0 computed)
        ratio = tl.where(tl.load(row + _B_CLIP) != 0.0, tl.minimum(ratio, 1.0), ratio)
        step = tl.where(tl.load(row + _B_ADAPT) != 0.0, step * ratio, step)
    inv_bc1 = (1.0 / _bias_correction(row, _B_LOGB1, k)).to(tl.float32)
    sqrt_bc2 = tl.sqrt(_bias_correction(row, _B_LOGB2, k)).to(tl.float32)
    return (_f32(row, _B_B1), _f32(row, _B_B3), _f32(row, _B_B2), _f32(row, _B_OMB2), _f32(row, _B_EPS),
            _f32(row, _B_WD), inv_bc1, sqrt_bc2, step.to(tl.float32))


@triton.jit
def _lamb_direction(p, g, m, v, c):
    """timm's Lamb's direction r: Adam's, bias corrected, plus L2 decay; and the moments."""
    b1, b3, b2, omb2, eps, wd, inv_bc1, sqrt_bc2, step = c
    m = m * b1 + g * b3
    v = v * b2 + g * g * omb2
    return _div(m, _div(tl.sqrt_rn(v), sqrt_bc2) + eps) * inv_bc1 + wd * p, m, v


@triton.jit
def _lamb(p, g, m, v, c):
    b1, b3, b2, omb2, eps, wd, inv_bc1, sqrt_bc2, step = c
    r, m, v = _lamb_direction(p, g, m, v, c)
    return p - r * step, m, v


@triton.jit
def _adamp_scalars(row, k, lr, red):
    """Adam's scalars, nesterov, and the decay 1 - lr wd f, f the tensor's decay factor (projection.py; in
    ``red``, Rows.meta: 1 in the pre-pass)."""
    step_size = (lr.to(tl.float64) / _bias_correction(row, _A_LOGB1, k)).to(tl.float32)
    sqrt_bc2 = tl.sqrt(_bias_correction(row, _A_LOGB2, k)).to(tl.float32)
    decay = (1.0 - lr.to(tl.float64) * tl.load(row + _A_WD) * tl.load(red + 2)).to(tl.float32)
    return (decay, _f32(row, _A_B1), _f32(row, _A_OMB1), _f32(row, _A_B2), _f32(row, _A_OMB2), _f32(row, _A_EPS),
            step_size, sqrt_bc2, tl.load(row + _P_NESTEROV) != 0.0)


@triton.jit
def _adamp_direction(p, g, m, v, c):
    """The adamp package's AdamP direction d (reference.py: _adamp_direction), and the moments."""
    decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2, nesterov = c
    m = m * b1 + g * omb1
    v = v * b2 + g * g * omb2
    denom = _div(tl.sqrt_rn(v), sqrt_bc2) + eps
    if nesterov:
        d = _div(m * b1 + g * omb1, denom)
    else:
        d = _div(m, denom)
    return d, m, v


@triton.jit
def _adamp(p, g, m, v, c, coef):
    """AdamP: its direction less ``coef`` p (the row's projection), the decay scaled by the tensor's factor."""
    decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2, nesterov = c
    d, m, v = _adamp_direction(p, g, m, v, c)
    u = d - coef * p
    return p * decay - u * step_size, m, v


@triton.jit
def _sgdp_scalars(row, k, lr, red):
    """SGDP's scalars: the decay 1 - lr wd f / (1 - momentum), f the tensor's decay factor (as _adamp_scalars)."""
    mom = tl.load(row + _Q_MOM)
    decay = (1.0 - lr.to(tl.float64) * tl.load(row + _Q_WD) * tl.load(red + 2) / (1.0 - mom)).to(tl.float32)
    return lr, decay, mom.to(tl.float32), _f32(row, _Q_OMDAMP), tl.load(row + _Q_NESTEROV) != 0.0


@triton.jit
def _sgdp_direction(p, g, buf, c):
    """The adamp package's SGDP direction (reference.py: _sgdp_direction), and the buffer."""
    lr, decay, mom, omdamp, nesterov = c
    buf = buf * mom + g * omdamp
    if nesterov:
        d = g + mom * buf
    else:
        d = buf
    return d, buf


@triton.jit
def _sgdp(p, g, buf, c, coef):
    """SGDP: its direction less ``coef`` p; without nesterov the buffer keeps the projected direction."""
    lr, decay, mom, omdamp, nesterov = c
    d, buf = _sgdp_direction(p, g, buf, c)
    u = d - coef * p
    if not nesterov:
        buf = u
    return p * decay - u * lr, buf


@triton.jit
def _sgd_sai_scalars(row, k, lr, red, gscale, scalar):
    """SGD-SaI's scalars (reference.py: _sgd_sai): the tensor's g-SNR, measured at its first step from its moments
    ``red`` (snr.gsnr, in float64, of the gradient times gscale) and else the one it keeps (``scalar``); the decay
    1 - lr wd and the step lr gsnr."""
    first = k == 1.0
    total, squares, count = tl.load(red), tl.load(red + 1), tl.load(red + 2)
    s = gscale.to(tl.float64)
    var = (squares - total * total / tl.maximum(count, 1.0)) / tl.maximum(count - 1.0, 1.0)
    std = tl.where(count > 1.0, tl.sqrt(tl.maximum(var, 0.0)), 0.0)
    fresh = s * tl.sqrt(squares) / (s * std + tl.load(row + _I_EPS))
    gsnr = tl.where(first, fresh.to(tl.float32), tl.load(scalar))
    lr64 = lr.to(tl.float64)
    return ((1.0 - lr64 * tl.load(row + _I_WD)).to(tl.float32), (lr64 * gsnr.to(tl.float64)).to(tl.float32),
            _f32(row, _I_MOM), _f32(row, _I_OMM), first, gsnr)


@triton.jit
def _sgd_sai(p, g, buf, c):
    """The sgd-sai package's SGD_sai: the buffer (the first gradient, then momentum b + (1 - momentum) g; none with
    momentum 0), decoupled decay, the step lr gsnr."""
    decay, step, mom, omm, first, gsnr = c
    if mom != 0.0:
        buf = tl.where(first, g, buf * mom + g * omm)
        g = buf
    return p * decay - g * step, buf


@triton.jit
def _scalars(RULE: tl.constexpr, row, k, lr, red, norm, amp_scale, REDUCE: tl.constexpr, scalar):
    """A rule's scalars; ``red`` (its tensor's per-tensor sums), ``norm`` and ``amp_scale`` (what _grad_scale reads)
    for a rule that reduces (Rule.reduces); REDUCE: for its pre-pass (without them). (Computing the gradient's factor
    before the scalars, for every rule, took Adan's bf16 kernel from 111 to 119 registers.)"""
    if RULE == _ADAMW or RULE == _ADABELIEF:
        c = _adam_scalars(row, k, lr)
    elif RULE == _LION:
        c = _lion_scalars(row, k, lr)
    elif RULE == _SGD:
        c = _sgd_scalars(row, k, lr)
    elif RULE == _ADAGRAD:
        c = _adagrad_scalars(row, k, lr)
    elif RULE == _LARS:
        c = _lars_scalars(row, k, lr, red, _grad_scale(row, norm, tl.load(amp_scale)))
    elif RULE == _LAMB:
        c = _lamb_scalars(row, k, lr, red, REDUCE)
    elif RULE == _DIFFGRAD:
        c = _diffgrad_scalars(row, k, lr)
    elif RULE == _ADAMP:
        c = _adamp_scalars(row, k, lr, red)
    elif RULE == _SGDP:
        c = _sgdp_scalars(row, k, lr, red)
    elif RULE == _SGD_SAI:
        c = _sgd_sai_scalars(row, k, lr, red, _grad_scale(row, norm, tl.load(amp_scale)), scalar)
    else:
        tl.static_assert(RULE == _ADAN, "a rule without Triton code")
        c = _adan_scalars(row, k, lr)
    return c


@triton.jit
def _direction(RULE: tl.constexpr, p, g, s0, s1, c):
    """The direction of a rule whose pre-pass reduces it (Rule.reduces_direction), and its first two state slots."""
    if RULE == _LAMB:
        r, s0, s1 = _lamb_direction(p, g, s0, s1, c)
    elif RULE == _ADAMP:
        r, s0, s1 = _adamp_direction(p, g, s0, s1, c)
    else:
        tl.static_assert(RULE == _SGDP, "a rule without a direction")
        r, s0 = _sgdp_direction(p, g, s0, c)
    return r, s0, s1


@triton.jit
def _update(RULE: tl.constexpr, p, g, s0, s1, s2, s3, c, coef):
    """A rule's update of a sub-tile; ``coef``: each element's row's projection coefficient (a rule that projects)."""
    if RULE == _ADAMW:
        p, s0, s1 = _adamw(p, g, s0, s1, c)
    elif RULE == _ADABELIEF:
        p, s0, s1 = _adabelief(p, g, s0, s1, c)
    elif RULE == _LION:
        p, s0 = _lion(p, g, s0, c)
    elif RULE == _SGD:
        p, s0 = _sgd(p, g, s0, c)
    elif RULE == _ADAGRAD:
        p, s0 = _adagrad(p, g, s0, c)
    elif RULE == _LARS:
        p, s0 = _lars(p, g, s0, c)
    elif RULE == _LAMB:
        p, s0, s1 = _lamb(p, g, s0, s1, c)
    elif RULE == _DIFFGRAD:
        p, s0, s1, s2 = _diffgrad(p, g, s0, s1, s2, c)
    elif RULE == _ADAMP:
        p, s0, s1 = _adamp(p, g, s0, s1, c, coef)
    elif RULE == _SGDP:
        p, s0 = _sgdp(p, g, s0, c, coef)
    elif RULE == _SGD_SAI:
        p, s0 = _sgd_sai(p, g, s0, c)
    else:
        p, s0, s1, s2, s3 = _adan(p, g, s0, s1, s2, s3, c)
    return p, s0, s1, s2, s3


@triton.jit
def _ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load_state(J: tl.constexpr, STATES: tl.constexpr, DTYPE: tl.constexpr, ptr, offs, mask, has_state, g, scales,
                n_blocks, POSITIVE: tl.constexpr):
    """State slot J, or g standing in where the rule has no slot J or the group keeps no state (unused). 8-bit state
    (int8 codes) is decoded with its block's scale (rounding.dequantize): w = |code| (absmax / levels), then w^2 with
    the code's sign, or (w^2)^2 for a slot that is never negative (bit J of POSITIVE)."""
    if J < STATES:
        if has_state:
            if DTYPE == tl.int8:
                code = tl.load(ptr + offs, mask=mask).to(tl.int32)
                absmax = tl.load(scales + J * n_blocks + offs // _QBLOCK, mask=mask)
                if (POSITIVE >> J) & 1:
                    w = (code & 0xFF).to(tl.float32) * _div(absmax, tl.full(absmax.shape, 255.0, tl.float32))
                    w2 = w * w
                    s = w2 * w2
                else:
                    w = tl.abs(code).to(tl.float32) * _div(absmax, tl.full(absmax.shape, 127.0, tl.float32))
                    s = tl.where(code < 0, _neg(w * w), w * w)
            else:
                s = tl.load(ptr + offs, mask=mask).to(tl.float32)
        else:
            s = g
    else:
        s = g
    return s


@triton.jit
def _store_state(J: tl.constexpr, STATES: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, SUB: tl.constexpr,
                 addr, offs, first, mask, has_state, s, STOCHASTIC: tl.constexpr, seed, slot, t, scales, n_blocks,
                 POSITIVE: tl.constexpr):
    """State slot J written back: rounded to nearest, or (bfloat16 or 8-bit state whose state_rounding is stochastic:
    the storage's) stochastically, from random-bit stream 1 + J; 8-bit state as codes and block scales
    (_store_codes)."""
    if J < STATES:
        if has_state:
            if DTYPE == tl.int8:
                if STOCHASTIC:
                    r = _random_bits(seed, slot, t, first, SUB, 1 + J).to(tl.float32)
                else:
                    r = tl.full((SUB,), -1.0, tl.float32)  # to nearest
                _store_codes(ALIGNED, SUB, addr, offs, first, mask, s, r, scales + J * n_blocks, n_blocks,
                             (POSITIVE >> J) & 1)
            elif STOCHASTIC:
                _store_stochastic(DTYPE, ALIGNED, addr, offs, mask, s, _random_bits(seed, slot, t, first, SUB, 1 + J))
            else:
                _store_nearest(DTYPE, ALIGNED, addr, offs, mask, s)


@triton.jit
def _store_codes(ALIGNED: tl.constexpr, SUB: tl.constexpr, addr, offs, first, mask, x, r, scales, n_blocks,
                 POSITIVE: tl.constexpr):
    """x as 8-bit codes and the scales of its SUB // QBLOCK blocks (first a multiple of QBLOCK; rounding.quantize):
    z = |x|^1/2 (or x^1/4, POSITIVE), absmax the block's largest z, y = z (levels / absmax), the code floor(y) + 1
    where the fraction y - floor(y) is at least 1/2 (r < 0: to nearest) or above r 2^-16 (r 16 random bits, as a float:
    stochastically), at most levels."""
    z = tl.sqrt_rn(tl.abs(x))
    if POSITIVE:
        z = tl.sqrt_rn(z)
        levels = 255.0
    else:
        levels = 127.0
    if mask is not None:
        z = tl.where(mask, z, 0.0)
    absmax = tl.max(tl.reshape(z, (SUB // _QBLOCK, _QBLOCK)), axis=1)
    blocks = first // _QBLOCK + tl.arange(0, SUB // _QBLOCK)
    tl.store(scales + blocks, absmax, mask=blocks < n_blocks)
    some = absmax > 0.0  # a block of zeros codes 0
    inv = tl.where(some, _div(tl.full(absmax.shape, levels, tl.float32), tl.where(some, absmax, 1.0)), 0.0)
    y = z * tl.reshape(tl.broadcast_to(tl.expand_dims(inv, 1), (SUB // _QBLOCK, _QBLOCK)), (SUB,))
    fl = tl.floor(y)
    up = tl.where(r < 0.0, y >= fl + 0.5, y > fl + r * 1.52587890625e-05)  # r 2^-16: sums float32 holds exactly
    q = tl.minimum(fl + tl.where(up, 1.0, 0.0), levels).to(tl.int32)
    if POSITIVE == 0:
        q = tl.where(x < 0.0, -q, q)
    tl.store(_ptr(addr, tl.int8, ALIGNED) + offs, q.to(tl.int8), mask=mask)


# How a parameter is read before its update and written after it (registry.CODECS; backends/rounding.py is the spec,
# csrc/rounding.cuh the CUDA twin): m_addr is its master slot (remainder, copy), (seed, slot, t) key the random bits
# of stochastic rounding, and offs are the elements' indices in the tensor.
@triton.jit
def _load_param(CODEC: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, p_addr, m_addr, offs, mask):
    if CODEC == _REMAINDER:  # the float32 master: the parameter's bits, then the signed remainder
        hi = tl.load(_ptr(p_addr, tl.uint16, ALIGNED) + offs, mask=mask).to(tl.uint32)
        low = tl.load(_ptr(m_addr, tl.int16, ALIGNED) + offs, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        x = ((hi << 16) + low).to(tl.float32, bitcast=True)
    elif CODEC == _CORRECTION:  # the 24-bit master: the parameter's bits, then the signed next 8
        hi = tl.load(_ptr(p_addr, tl.uint16, ALIGNED) + offs, mask=mask).to(tl.uint32)
        low = tl.load(_ptr(m_addr, tl.int8, ALIGNED) + offs, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        x = ((hi << 16) + (low << 8)).to(tl.float32, bitcast=True)
    elif CODEC == _COPY:  # the float32 copy, unless someone else wrote the parameter since
        ph = tl.load(_ptr(p_addr, tl.float16, ALIGNED) + offs, mask=mask).to(tl.float32)
        m = tl.load(_ptr(m_addr, tl.float32, ALIGNED) + offs, mask=mask)
        x = tl.where(m.to(tl.float16).to(tl.float32) == ph, m, ph)
    else:
        x = tl.load(_ptr(p_addr, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    return x


@triton.jit
def _random_bits(seed, slot, t, first, SUB: tl.constexpr, STREAM: tl.constexpr):
    """The 16 random bits of elements first ... first + SUB - 1 (first a multiple of 8; rounding.random_bits) in random
    stream STREAM (0: the parameter, 1 + j: state slot j): one Philox call per 8 elements, element 8 n + i taking half
    i % 2 (low, high) of word i // 2 of call n."""
    block = first // 8 + tl.arange(0, SUB // 8).to(tl.int64)
    r0, r1, r2, r3 = tl.philox(seed, block.to(tl.uint32), ((block >> 32) | (STREAM << 24)).to(tl.uint32),
                               slot.to(tl.uint32), t.to(tl.uint32))
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (SUB // 2,))  # r0 r1 r2 r3 per call
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), (SUB,))


@triton.jit
def _round_stochastic_half(x, r):
    """x to the float32 that holds its float16 rounding by 16 random bits r (rounding.round_stochastic_half): from
    2^-14 up, the top 13 bits of r carry the 13 mantissa bits float16 drops; below, where the spacing is 2^-24,
    all 16 carry the fraction of |x| 2^24 truncated to 16 bits. A NaN stays a NaN."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    normal = ((a + (r >> 3)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    m = a.to(tl.float32, bitcast=True) * 16777216.0  # |x| 2^24: exact
    n = tl.floor(m)
    frac16 = ((m - n) * 65536.0).to(tl.uint32)  # truncated: floor
    tiny = (n + tl.where(r + frac16 >= 65536, 1.0, 0.0)) * 5.9604644775390625e-8  # 2^-24
    y = tl.where(a >= 0x38800000, normal, tiny)
    y = (y.to(tl.uint32, bitcast=True) | (b & 0x80000000)).to(tl.float32, bitcast=True)  # y >= 0: -0.0 kept
    return tl.where(x != x, x, y)


@triton.jit
def _bfloat16_bits(x, add):
    """The bfloat16 bits of x plus ``add`` in its 16 dropped bits, the carry rounding up (0x8000: to nearest, ties away
    from zero; 16 random bits: stochastically). A NaN stays a NaN."""
    b = x.to(tl.uint32, bitcast=True)
    return tl.where(x != x, (b >> 16) | 0x40, (b + add) >> 16)


@triton.jit
def _store_nearest(DTYPE: tl.constexpr, ALIGNED: tl.constexpr, addr, offs, mask, x):
    """x rounded to nearest (ties to even) into storage of DTYPE at addr. bfloat16 by its bits: what the GPU's
    conversion computes, which Triton's interpreter (how CI runs this kernel) does not: it truncates."""
    if DTYPE == tl.bfloat16:
        even = 0x7FFF + ((x.to(tl.uint32, bitcast=True) >> 16) & 1)
        tl.store(_ptr(addr, tl.uint16, ALIGNED) + offs, _bfloat16_bits(x, even).to(tl.uint16), mask=mask)
    else:
        tl.store(_ptr(addr, DTYPE, ALIGNED) + offs, x.to(DTYPE), mask=mask)


@triton.jit
def _store_stochastic(DTYPE: tl.constexpr, ALIGNED: tl.constexpr, addr, offs, mask, x, r):
    """x rounded stochastically by 16 random bits r into 16-bit storage at addr (rounding.round_stochastic and
    round_stochastic_half)."""
    if DTYPE == tl.float16:
        tl.store(_ptr(addr, tl.float16, ALIGNED) + offs, _round_stochastic_half(x, r).to(tl.float16), mask=mask)
    else:
        tl.store(_ptr(addr, tl.uint16, ALIGNED) + offs, _bfloat16_bits(x, r).to(tl.uint16), mask=mask)


@triton.jit
def _store_param(CODEC: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, SUB: tl.constexpr, p_addr, m_addr,
                 offs, first, mask, x, seed, slot, t):
    if CODEC == _STOCHASTIC:
        _store_stochastic(DTYPE, ALIGNED, p_addr, offs, mask, x, _random_bits(seed, slot, t, first, SUB, 0))
    elif CODEC == _REMAINDER:  # to nearest, ties away from zero: the remainder then fits 16 signed bits
        hi = _bfloat16_bits(x, 0x8000)
        tl.store(_ptr(p_addr, tl.uint16, ALIGNED) + offs, hi.to(tl.uint16), mask=mask)
        low = (x.to(tl.uint32, bitcast=True) - (hi << 16)).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(_ptr(m_addr, tl.int16, ALIGNED) + offs, low, mask=mask)
    elif CODEC == _CORRECTION:  # stochastically to 24 bits (the top 8 random bits), then split as the remainder
        b = (x.to(tl.uint32, bitcast=True) + (_random_bits(seed, slot, t, first, SUB, 0) >> 8)) & 0xFFFFFF00
        hi = tl.where(x != x, _bfloat16_bits(x, 0x8000), (b + 0x8000) >> 16)
        tl.store(_ptr(p_addr, tl.uint16, ALIGNED) + offs, hi.to(tl.uint16), mask=mask)
        low = tl.where(x != x, 0, (b - (hi << 16)).to(tl.int32, bitcast=True) >> 8)
        tl.store(_ptr(m_addr, tl.int8, ALIGNED) + offs, low.to(tl.int8), mask=mask)
    elif CODEC == _COPY:
        tl.store(_ptr(m_addr, tl.float32, ALIGNED) + offs, x, mask=mask)
        tl.store(_ptr(p_addr, tl.float16, ALIGNED) + offs, x.to(tl.float16), mask=mask)
    else:
        _store_nearest(DTYPE, ALIGNED, p_addr, offs, mask, x)


@triton.jit
def _chunk(RULE: tl.constexpr, STATES: tl.constexpr, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
           CODEC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
           STOCHASTIC_STATE: tl.constexpr, POSITIVE: tl.constexpr, REDUCE: tl.constexpr, PROJECT: tl.constexpr,
           p_addr, g_addr, a0, a1, a2, a3, m_addr, scales, n_blocks, start, numel, c, has_state, gscale, seed, slot,
           t, squares, squares_stride, pid, coefs, row_rem, row_len):
    """Update elements [start, min(start + BLOCK, numel)) of one tensor, SUB elements at a time, the gradient
    multiplied by gscale (1 / GradScaler's scale, times its group's clipping factor). The parameter is read and
    written by its CODEC (_load_param, _store_param); the gradient and the state slots are loaded to float32 from
    their dtype (DTYPE for the gradient, STATE_DTYPE for the state), and the state stored by _store_state.
    REDUCE (the pre-pass of a rule that reduces its "update"): store nothing, but the sums of squares of the
    parameter and of the update's direction, in float64, at squares[pid] and squares[squares_stride + pid]
    (Part.squares); for a rule that projects (PROJECT: registry.PROJECTION), within one row, the sums of p^2, g^2,
    p g and p d at squares[j squares_stride + pid] (Rows.squares). A rule that projects reads each element's row's
    coefficient from ``coefs`` (Rows.coefs, from the row of ``start``: rows of ``row_len`` elements, ``start`` the
    ``row_rem``-th of its row; int32, so that each element's row is an int32 division)."""
    if PROJECT:  # four sums: each sub-tile's added into one (four per element took the bf16 pre-pass to 140 registers)
        ACC: tl.constexpr = 1
    else:
        ACC: tl.constexpr = SUB
    acc_p = tl.zeros((ACC,), tl.float64)
    acc_r = tl.zeros((ACC,), tl.float64)
    acc_g = tl.zeros((ACC,), tl.float64)
    acc_d = tl.zeros((ACC,), tl.float64)
    gp = _ptr(g_addr, DTYPE, ALIGNED)
    q0 = _ptr(a0, STATE_DTYPE, ALIGNED)
    q1 = _ptr(a1, STATE_DTYPE, ALIGNED)
    q2 = _ptr(a2, STATE_DTYPE, ALIGNED)
    q3 = _ptr(a3, STATE_DTYPE, ALIGNED)
    # A static trip count, also for a tensor's last (masked) chunk: bounding that loop by the elements
    # left made ptxas use 127 registers in bf16, or spill, depending on the sub-tile.
    for sub in range(0, BLOCK, SUB):
        offs = start + sub + tl.arange(0, SUB).to(tl.int64)
        if ALIGNED or not PROJECT:  # (an item of a row may start anywhere)
            offs = tl.max_contiguous(tl.multiple_of(offs, SUB), SUB)
        if MASKED:
            mask = offs < numel
        else:
            mask = None
        p = _load_param(CODEC, DTYPE, ALIGNED, p_addr, m_addr, offs, mask)
        g = tl.load(gp + offs, mask=mask).to(tl.float32) * gscale
        s0 = _load_state(0, STATES, STATE_DTYPE, q0, offs, mask, has_state, g, scales, n_blocks, POSITIVE)
        s1 = _load_state(1, STATES, STATE_DTYPE, q1, offs, mask, has_state, g, scales, n_blocks, POSITIVE)
        s2 = _load_state(2, STATES, STATE_DTYPE, q2, offs, mask, has_state, g, scales, n_blocks, POSITIVE)
        s3 = _load_state(3, STATES, STATE_DTYPE, q3, offs, mask, has_state, g, scales, n_blocks, POSITIVE)
        if REDUCE:
            r, s0, s1 = _direction(RULE, p, g, s0, s1, c)
            if MASKED:
                p = tl.where(mask, p, 0.0)
                r = tl.where(mask, r, 0.0)
                g = tl.where(mask, g, 0.0)
            p64 = p.to(tl.float64)
            if PROJECT:
                acc_p += tl.sum(p64 * p64, 0)
                acc_g += tl.sum(g.to(tl.float64) * g.to(tl.float64), 0)
                acc_r += tl.sum(p64 * g.to(tl.float64), 0)
                acc_d += tl.sum(p64 * r.to(tl.float64), 0)
            else:
                acc_p += p64 * p64
                acc_r += r.to(tl.float64) * r.to(tl.float64)
        else:
            if PROJECT:  # (a gather per element: it took AdamP's bf16 update from 78 registers to 96)
                coef = tl.load(coefs + (row_rem + sub + tl.arange(0, SUB)) // row_len, mask=mask)
            else:
                coef = 0.0
            p, s0, s1, s2, s3 = _update(RULE, p, g, s0, s1, s2, s3, c, coef)
            _store_param(CODEC, DTYPE, ALIGNED, SUB, p_addr, m_addr, offs, start + sub, mask, p, seed, slot, t)
            # (mask may be None, which a tuple cannot carry into a call: the arguments are written out)
            _store_state(0, STATES, STATE_DTYPE, ALIGNED, SUB, a0, offs, start + sub, mask, has_state, s0,
                         STOCHASTIC_STATE, seed, slot, t, scales, n_blocks, POSITIVE)
            _store_state(1, STATES, STATE_DTYPE, ALIGNED, SUB, a1, offs, start + sub, mask, has_state, s1,
                         STOCHASTIC_STATE, seed, slot, t, scales, n_blocks, POSITIVE)
            _store_state(2, STATES, STATE_DTYPE, ALIGNED, SUB, a2, offs, start + sub, mask, has_state, s2,
                         STOCHASTIC_STATE, seed, slot, t, scales, n_blocks, POSITIVE)
            _store_state(3, STATES, STATE_DTYPE, ALIGNED, SUB, a3, offs, start + sub, mask, has_state, s3,
                         STOCHASTIC_STATE, seed, slot, t, scales, n_blocks, POSITIVE)
    if REDUCE:
        tl.store(squares + pid, tl.sum(acc_p, 0))
        if PROJECT:
            tl.store(squares + squares_stride + pid, tl.sum(acc_g, 0))
            tl.store(squares + 2 * squares_stride + pid, tl.sum(acc_r, 0))
            tl.store(squares + 3 * squares_stride + pid, tl.sum(acc_d, 0))
        else:
            tl.store(squares + squares_stride + pid, tl.sum(acc_r, 0))


@triton.jit
def _grad_scale(row, norm, amp_scale):
    """What each gradient of the group is multiplied by (csrc/updates.cuh: grad_scale): 1 / amp_scale (GradScaler's
    scale; 1 without one) times the clipping factor min(1, max_grad_norm / (norm / amp_scale + eps)) of the
    unscaled gradients, in float64 (Rule.clipping), as a float32; the clipping factor is 1 for a group that does not
    clip (norm then points at zeros). A NaN norm gives NaN, as clip_grad_norm_ does (tl.minimum would give 1: the
    gradients applied unclipped); an infinite one 0."""
    # in float32, as every backend (exact for GradScaler's powers of two)
    inv = _div(tl.full(amp_scale.shape, 1.0, tl.float32), amp_scale).to(tl.float64)
    max_norm = tl.load(row + _MAX_GRAD_NORM)
    scale = max_norm / (tl.load(norm) * inv + tl.load(row + _CLIP_EPS))
    scale = tl.where(scale >= 1.0, 1.0, scale)
    return (tl.where(max_norm > 0.0, scale, 1.0) * inv).to(tl.float32)


@triton.jit
def _sumsq_kernel(work, tensors, grads, out, STATES: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  SUB: tl.constexpr, PARAM: tl.constexpr):
    """The pre-pass: out[program] = the sum of squares, in float64, of its chunk of a gradient (0 without one), or
    with PARAM of the parameter as stored (0 when it has no gradient either: the per-tensor pre-pass of Rule.reduces):
    float32 squares overflow above 1.8e19, and the norm of finite gradients stays finite (csrc: chunk_sumsq)."""
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    trow = tensors + slot * (_STATE0 + STATES)
    g_addr = tl.load(grads + tl.load(trow + _GRAD_SLOT))
    numel = tl.where(g_addr != _NO_GRAD, tl.load(trow + _NUMEL), 0)
    if PARAM:
        g_addr = tl.load(trow + _PARAM)
    acc = tl.zeros((SUB,), tl.float64)
    if (start + BLOCK <= numel) & (g_addr % 16 == 0):  # a full aligned chunk: unmasked 16-byte loads
        gp = tl.multiple_of(g_addr.to(tl.pointer_type(DTYPE)), 16)
        for sub in range(0, BLOCK, SUB):
            offs = tl.max_contiguous(tl.multiple_of(start + sub + tl.arange(0, SUB).to(tl.int64), SUB), SUB)
            g = tl.load(gp + offs).to(tl.float64)
            acc += g * g
    elif start < numel:
        gp = g_addr.to(tl.pointer_type(DTYPE))
        for sub in range(0, BLOCK, SUB):
            offs = start + sub + tl.arange(0, SUB).to(tl.int64)
            g = tl.load(gp + offs, mask=offs < numel, other=0.0).to(tl.float64)
            acc += g * g
    tl.store(out + pid, tl.sum(acc, 0))


@triton.jit
def _state_addr(trow, J: tl.constexpr, STATES: tl.constexpr, p_addr):
    if J < STATES:
        a = tl.load(trow + _STATE0 + J)
    else:
        a = p_addr  # never read nor written
    return a


@triton.jit
def _step_kernel(work, tensors, grads, groups, gaddr, done, norm, reduced, grad_scale, found_inf, n_rows, n_groups,
                 advance, squares, squares_stride, coefs,
                 RULE: tl.constexpr, STATES: tl.constexpr, NG: tl.constexpr, DTYPE: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, CODEC: tl.constexpr, STOCHASTIC_STATE: tl.constexpr, BLOCK: tl.constexpr,
                 SUB: tl.constexpr, GROUPS: tl.constexpr, POSITIVE: tl.constexpr, REDUCE: tl.constexpr,
                 REDUCES: tl.constexpr, PROJECT: tl.constexpr, SCALAR: tl.constexpr, TABLES: tl.constexpr):
    """One work item's update; or, REDUCE, the pre-pass of a rule that reduces its update's direction (_chunk),
    which writes nothing else and leaves the counters alone. ``reduced``: REDUCES float64 per tensor row, its sums (the
    pre-pass's, summed over shards), or for a rule that projects its Rows.meta (row length, first row in ``coefs``,
    decay factor: PROJECT, Rule.projects); such a rule's pre-pass walks Rows.work, whose items each lie in one row."""
    tl.static_assert(STATES <= 4, "the kernel has four state slots")
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    trow = tensors + slot * (_STATE0 + STATES)
    p_addr = tl.load(trow + _PARAM)
    tensor_slot = tl.load(trow + _GRAD_SLOT)  # its position in the optimizer: the gradient table's, a random key's
    g_addr = tl.load(grads + tensor_slot)
    step_ptr = tl.load(trow + _STEP).to(tl.pointer_type(tl.float32))
    # No gradient this step, or GradScaler found an inf: nothing to update (the counters still run)
    numel = tl.where((g_addr != _NO_GRAD) & (tl.load(found_inf) == 0.0), tl.load(trow + _NUMEL), 0)
    gi = tl.load(trow + _GROUP)
    info = tl.load(trow + _INFO)
    row = groups + gi * NG
    lr, counter = _group_lr(groups, gaddr, gi, None, NG, TABLES)
    k = tl.load(step_ptr) + 1.0  # this tensor's step count after this update
    red = reduced + REDUCES * slot
    if SCALAR:  # its per-tensor state (Rule.scalar), which the update keeps (_count)
        scalar_ptr = tl.load(trow + _SCALAR).to(tl.pointer_type(tl.float32))
    else:
        scalar_ptr = step_ptr  # never read nor written
    c = _scalars(RULE, row, k, lr, red, norm, grad_scale, REDUCE, scalar_ptr)
    has_state = tl.load(row + _HAS_STATE) != 0.0  # SGD without momentum keeps no buffer
    gscale = _grad_scale(row, norm, tl.load(grad_scale))

    if CODEC == _REMAINDER or CODEC == _COPY or CODEC == _CORRECTION:
        m_addr = tl.load(trow + _MASTER)
    else:
        m_addr = p_addr  # never read nor written
    if STATE_DTYPE == tl.int8:  # the block scales of 8-bit state: [STATES, n_blocks] float32
        scales = tl.load(trow + _ABSMAX).to(tl.pointer_type(tl.float32))
        n_blocks = (tl.load(trow + _NUMEL) + _QBLOCK - 1) // _QBLOCK
    else:
        scales, n_blocks = step_ptr, 0  # never read nor written
    if CODEC == _STOCHASTIC or CODEC == _CORRECTION or STOCHASTIC_STATE:  # the random bits' key: seed, tensor, t
        seed, t = tl.load(row + _SEED).to(tl.int64), tl.load(counter)
    else:
        seed, t = 0, 0
    addrs = (p_addr, g_addr, _state_addr(trow, 0, STATES, p_addr), _state_addr(trow, 1, STATES, p_addr),
             _state_addr(trow, 2, STATES, p_addr), _state_addr(trow, 3, STATES, p_addr), m_addr, scales, n_blocks)
    if PROJECT:
        row_len = tl.maximum(tl.load(red).to(tl.int64), 1)  # (0 for a tensor of 0-element rows, never walked)
        first_row = start // row_len
        coefs += tl.load(red + 1).to(tl.int64) + first_row
        if REDUCE:  # the end of this item's row
            numel = tl.minimum(numel, (first_row + 1) * row_len)
        # int32 from here (an element's row is an int32 division in _chunk): a row of 2^31 elements or more is a 1-dim
        # tensor's, its only row (backends/plan.py: check_rows refuses others)
        one_row = row_len >= 2**31 - 2 * BLOCK
        row_rem = tl.where(one_row, 0, start - first_row * row_len).to(tl.int32)
        row_len = tl.where(one_row, 2**31 - 1, row_len).to(tl.int32)
    else:
        row_rem, row_len = 0, 1
    rest = (c, has_state, gscale, seed, tensor_slot, t, squares, squares_stride, pid, coefs, row_rem, row_len)
    # (constexprs go apart: a tuple hands them on as values, which compile to the same code but fail a static_assert)
    if start + BLOCK <= numel:
        # p and state aligned (info), and this step's gradient
        vector = ((info & 1) != 0) & (g_addr % 16 == 0)
        if PROJECT and REDUCE:  # an item of a row starts anywhere
            vector = vector & (start % SUB == 0)
        if vector:
            _chunk(RULE, STATES, DTYPE, STATE_DTYPE, CODEC, BLOCK, SUB, False, True, STOCHASTIC_STATE, POSITIVE, REDUCE,
                   PROJECT, *addrs, start, numel, *rest)
        else:
            _chunk(RULE, STATES, DTYPE, STATE_DTYPE, CODEC, BLOCK, _SCALAR_SUB, False, False, STOCHASTIC_STATE,
                   POSITIVE, REDUCE, PROJECT, *addrs, start, numel, *rest)
    elif start < numel:
        _chunk(RULE, STATES, DTYPE, STATE_DTYPE, CODEC, BLOCK, _SCALAR_SUB, True, False, STOCHASTIC_STATE, POSITIVE,
               REDUCE, PROJECT, *addrs, start, numel, *rest)
    elif REDUCE:  # no gradient, or a skipped step: sums of nothing
        tl.store(squares + pid, 0.0)
        tl.store(squares + squares_stride + pid, 0.0)
        if PROJECT:
            tl.store(squares + 2 * squares_stride + pid, 0.0)
            tl.store(squares + 3 * squares_stride + pid, 0.0)
    if not REDUCE:
        if SCALAR:
            kept = c[5]  # (SGD-SaI's g-SNR: the only rule with a scalar state gives it last)
        else:
            kept = 0.0
        _count(done, slot, info, n_rows, g_addr, found_inf, step_ptr, k, advance, groups, gaddr, n_groups, NG, GROUPS,
               scalar_ptr, kept, SCALAR, TABLES)


@triton.jit
def _count(done, slot, info, n_rows, g_addr, found_inf, step_ptr, k, advance, groups, gaddr, n_groups,
           NG: tl.constexpr, GROUPS: tl.constexpr, scalar_ptr, kept, SCALAR: tl.constexpr, TABLES: tl.constexpr):
    """The counters, after a work item's update; and a rule's per-tensor state (SCALAR: ``kept``), written with the
    step count."""
    # Counters: the last chunk of a tensor advances its step; the last tensor advances the groups.
    # The barrier makes every warp's reads of this step's counters precede the release below (the
    # atomic is one thread's), so no warp can read a counter after another program advanced it.
    tl.debug_barrier()
    chunks_done = tl.atomic_add(done + slot, 1, sem="acq_rel")
    if chunks_done == (info >> 1) - 1:
        tl.store(done + slot, 0)
        # not the sentinel, nor a tensor without a gradient, nor a skipped step (found_inf is read again here:
        # a flag kept live across the chunk took ptxas to 64 registers and a spill, from 71 and none)
        if (slot < n_rows - 1) & (g_addr != _NO_GRAD) & (tl.load(found_inf) == 0.0):
            tl.store(step_ptr, k)
            if SCALAR:
                tl.store(scalar_ptr, kept)
        rows_done = tl.atomic_add(done + n_rows, 1, sem="acq_rel")
        if rows_done == n_rows - 1:
            tl.store(done + n_rows, 0)
            if advance != 0:  # every group at once: its lr (as every program computed it) and t + 1
                gs = tl.arange(0, GROUPS)
                in_use = gs < n_groups
                lrs, counters = _group_lr(groups, gaddr, gs, in_use, NG, TABLES)
                lr_outs = tl.load(gaddr + _GROUP_ADDRESSES * gs + _LR_OUT_ADDRESS, mask=in_use)
                tl.store(lr_outs.to(tl.pointer_type(tl.float32)), lrs, mask=in_use)
                tl.store(counters, tl.load(counters, mask=in_use) + 1, mask=in_use)


def sub_tile(*dtypes: torch.dtype) -> int:
    """Elements per sub-tile: one VECTOR_BYTES access per thread and tensor of the narrowest of ``dtypes`` (a wider
    one takes several; a narrower one would take a fraction of a vector, which loses the 128-bit accesses). 8-bit
    state counts as 16-bit: 8 of its codes per thread (8-byte accesses), which keeps a sub-tile's float32 values per
    thread those of 16-bit state."""
    return VECTOR_BYTES * 32 * NUM_WARPS // min(max(d.itemsize, 2) for d in dtypes)


def prepare(rule: str, work: Sequence[GroupWork], cache: StepCache, grads: GradSource) -> Step:
    plan, table = Plan.for_step(cache.plans, "triton", rule, work, BLOCK, grads)
    spec, n_groups = RULES[rule], len(work)
    ng, groups = len(group_cols(rule)), triton.next_power_of_2(n_groups)

    def step_kernel(part: Part, norm: torch.Tensor | None, amp: Amp | None, reduced: torch.Tensor,
                    advance: bool = False, reduce: bool = False) -> None:
        grad_scale, found_inf = plan.amp_args(amp)
        rows = part.rows
        squares = plan.scratch if part.squares is None else part.squares
        work, coefs = part.work, plan.scratch
        if rows is not None:  # a rule that projects: its rows' meta, and its pre-pass walks the rows
            reduced, coefs = rows.meta, rows.coefs
            if reduce:
                work, squares = rows.work, rows.squares
        if work.shape[0] == 0:
            return
        _step_kernel[(work.shape[0],)](
            work, part.tensors, table, plan.groups, plan.gaddr, part.done, plan.scratch if norm is None else norm,
            reduced, grad_scale, found_inf, part.tensors.shape[0], n_groups, int(advance), squares, squares.stride(0),
            coefs, RULE=spec.id, STATES=len(spec.states), NG=ng, DTYPE=_TL_DTYPE[part.dtype],
            STATE_DTYPE=_TL_DTYPE[part.state_dtype], CODEC=CODECS.index(part.codec),
            STOCHASTIC_STATE=part.state_rounding == "stochastic", BLOCK=BLOCK,
            SUB=sub_tile(part.dtype, part.state_dtype),
            GROUPS=groups, POSITIVE=spec.positive_bits, REDUCE=reduce, REDUCES=len(spec.reduces),
            PROJECT=spec.projects, SCALAR=spec.scalar is not None, TABLES=bool(plan.tables), num_warps=NUM_WARPS,
            enable_fp_fusion=FP_FUSION)

    def update(norm: torch.Tensor | None, amp: Amp | None, sums: torch.Tensor | None) -> None:
        with plan.on_device():  # Triton launches on the current device: make it the parameters'
            if spec.projects:
                plan.project(sums)
            plan.launch(lambda part, advance: step_kernel(part, norm, amp, plan.sums_of(part, sums), advance))

    def sumsq(part: Part, out: torch.Tensor, param: bool = False) -> None:
        _sumsq_kernel[(part.work.shape[0],)](part.work, part.tensors, table, out, STATES=len(spec.states),
                                             DTYPE=_TL_DTYPE[part.dtype], BLOCK=BLOCK, SUB=sub_tile(part.dtype),
                                             PARAM=param, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def grad_sumsq(per_row: bool = False) -> torch.Tensor:
        with plan.on_device():
            return plan.grad_sumsq(lambda part: sumsq(part, part.partials), per_row)

    def reduce(norm: torch.Tensor | None, amp: Amp | None) -> torch.Tensor:
        with plan.on_device():
            return plan.reduce(sumsq, lambda part: step_kernel(part, norm, amp, plan.scratch, reduce=True), work)

    return Step(update, grad_sumsq, reduce, lambda: plan.slots(work))
