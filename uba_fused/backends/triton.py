"""backend="triton": one launch per step (per parameter dtype) over the whole parameter list.

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

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .plan import GROUP_COLS, NO_GRAD, TENSOR_COLS, Plan
from .work import RULE_ID, GradSource, GroupWork

BLOCK = 4096      # elements per program; 4K-16K all reached 0.96-0.99 of copy bandwidth in the probes
NUM_WARPS = 4
# A program walks its chunk in sub-tiles: on the vector path (aligned full chunks) one 16-byte vector per
# thread and tensor (512 fp32 or 1024 bf16 elements with 4 warps), as the CUDA kernel's loop does; on
# the scalar paths (a tensor's last chunk, a misaligned tensor) 4 elements per thread, since each scalar
# access holds its own 64-bit address. The whole chunk at once kept 32 elements of each of 4 tensors per
# thread live: ptxas (sm_90) gave 255 registers and spilled 532 bytes per thread (AdamW fp32; 688 in
# bf16), and on an H100 bf16 reached only 0.70-0.74 of copy bandwidth. Sub-tiles of one vector on every
# path still took 95 registers in bf16 (128 with triton 3.6's ptxas), all of it on the scalar paths;
# now 40-56 registers in every rule and dtype, no spills. tests/test_triton_codegen.py keeps the bound.
VECTOR_BYTES = 16
_SCALAR_SUB = tl.constexpr(4 * 32 * NUM_WARPS)
# Table layouts of plan.py, as compile-time constants of the kernels.
_NT = tl.constexpr(TENSOR_COLS)
_NO_GRAD = tl.constexpr(NO_GRAD)
_NG = tl.constexpr(len(GROUP_COLS))
(_LR, _B1, _B2, _OMB1, _OMB2, _LOGB1, _LOGB2, _EPS, _WD, _MOM, _OMDAMP, _NESTEROV, _KIND, _WARMUP, _TOTAL,
 _MINR, _PHI, _HAS_STATE) = (tl.constexpr(i) for i in range(len(GROUP_COLS)))
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _schedule_factor(t, kind, warmup, total, min_ratio, phi):
    """factor(t) of schedules.py in float32 (csrc/schedules.cuh is the same function)."""
    p = tl.minimum(tl.maximum((t - warmup) / tl.maximum(total - warmup, 1.0), 0.0), 1.0)  # T - W >= 1
    c = 1.0 + tl.cos(3.141592653589793 * p)
    uba = 2.0 * c / (2.0 * phi + (2.0 - phi) * c)
    shape = tl.where(kind == 1, uba, tl.where(kind == 2, 0.5 * c, tl.where(kind == 3, 1.0 - p,
                                                                             (1.0 - p) / (1.0 - 0.5 * p))))
    decay = tl.where(kind == 0, 1.0, min_ratio + (1.0 - min_ratio) * shape)
    return tl.where(t < warmup, (t + 1.0) / tl.maximum(warmup, 1.0), decay)


@triton.jit
def _group_lr(groups, gaddr, gi, mask):
    """The lr of group(s) gi for this step, with the address(es) of their step counters."""
    row = groups + gi * _NG
    counter = tl.load(gaddr + 2 * gi, mask=mask).to(tl.pointer_type(tl.int64))
    t = tl.load(counter, mask=mask).to(tl.float32)
    f = _schedule_factor(t, tl.load(row + _KIND, mask=mask).to(tl.float32),
                         tl.load(row + _WARMUP, mask=mask).to(tl.float32),
                         tl.load(row + _TOTAL, mask=mask).to(tl.float32),
                         tl.load(row + _MINR, mask=mask).to(tl.float32), tl.load(row + _PHI, mask=mask).to(tl.float32))
    return tl.load(row + _LR, mask=mask).to(tl.float32) * f, counter


@triton.jit
def _f32(row, col):
    return tl.load(row + col).to(tl.float32)


@triton.jit
def _rule_scalars(row, k, lr):
    """What every element of one tensor's chunk needs (csrc/updates.cuh: rule_scalars), loaded once per
    program: hyper-parameters from the group row, bias corrections in float64 from the step count k."""
    bc1 = 1.0 - tl.exp(k.to(tl.float64) * tl.load(row + _LOGB1))
    sqrt_bc2 = tl.sqrt(1.0 - tl.exp(k.to(tl.float64) * tl.load(row + _LOGB2))).to(tl.float32)
    step_size = (lr.to(tl.float64) / bc1).to(tl.float32)
    return (lr, _f32(row, _WD), _f32(row, _B1), _f32(row, _OMB1), _f32(row, _B2), _f32(row, _OMB2), _f32(row, _EPS),
            _f32(row, _MOM), _f32(row, _OMDAMP), step_size, sqrt_bc2, tl.load(row + _NESTEROV) != 0.0, k == 1.0)


@triton.jit
def _update(RULE: tl.constexpr, p, g, a, b, s):
    """One step of the rule on float32 blocks (a, b: the rule's state; s: _rule_scalars); returns p, a, b."""
    lr, wd, b1, omb1, b2, omb2, eps, mom, omdamp, step_size, sqrt_bc2, nesterov, first = s
    if RULE == 0 or RULE == 1:  # AdamW, AdaBelief
        p = p * (1.0 - lr * wd)
        a = a * b1 + g * omb1
        if RULE == 0:
            b = b * b2 + g * g * omb2
        else:
            r = g - a
            b = b * b2 + r * r * omb2 + eps
        p = p - a / (tl.sqrt_rn(b) / sqrt_bc2 + eps) * step_size
    elif RULE == 2:  # Lion
        c = a * b1 + g * omb1
        sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        p = p * (1.0 - lr * wd) - sign * lr
        a = a * b2 + g * omb2
    else:  # SGD: L2 decay into the gradient; the buffer starts as the first gradient
        g = g + wd * p
        if mom != 0.0:
            a = tl.where(first, g, a * mom + g * omdamp)
            if nesterov:
                g = g + mom * a
            else:
                g = a
        p = p - g * lr
    return p, a, b


@triton.jit
def _chunk(RULE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, MASKED: tl.constexpr,
           ALIGNED: tl.constexpr, p_addr, g_addr, a_addr, b_addr, start, numel, s, has_state):
    """Update elements [start, min(start + BLOCK, numel)) of one tensor, SUB elements at a time."""
    pp = p_addr.to(tl.pointer_type(DTYPE))
    gp = g_addr.to(tl.pointer_type(DTYPE))
    ap = a_addr.to(tl.pointer_type(DTYPE))
    bp = b_addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pp = tl.multiple_of(pp, 16)
        gp = tl.multiple_of(gp, 16)
        ap = tl.multiple_of(ap, 16)
        bp = tl.multiple_of(bp, 16)
    # A static trip count, also for a tensor's last (masked) chunk: bounding that loop by the elements
    # left made ptxas use 127 registers in bf16, or spill, depending on the sub-tile.
    for sub in range(0, BLOCK, SUB):
        offs = start + sub + tl.arange(0, SUB).to(tl.int64)
        offs = tl.max_contiguous(tl.multiple_of(offs, SUB), SUB)
        if MASKED:
            mask = offs < numel
        else:
            mask = None
        p = tl.load(pp + offs, mask=mask).to(tl.float32)
        g = tl.load(gp + offs, mask=mask).to(tl.float32)
        if has_state:
            a = tl.load(ap + offs, mask=mask).to(tl.float32)
        else:
            a = g
        if RULE < 2:
            b = tl.load(bp + offs, mask=mask).to(tl.float32)
        else:
            b = a
        p, a, b = _update(RULE, p, g, a, b, s)
        tl.store(pp + offs, p.to(DTYPE), mask=mask)
        if has_state:
            tl.store(ap + offs, a.to(DTYPE), mask=mask)
        if RULE < 2:
            tl.store(bp + offs, b.to(DTYPE), mask=mask)


@triton.jit
def _step_kernel(work, tensors, grads, groups, gaddr, done, n_rows, n_groups, advance,
                 RULE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                 GROUPS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    trow = tensors + slot * _NT
    p_addr = tl.load(trow + 0)
    g_addr = tl.load(grads + tl.load(trow + 1))  # the gradient table, at this tensor's slot
    a_addr = tl.load(trow + 2)
    b_addr = tl.load(trow + 3)
    step_ptr = tl.load(trow + 4).to(tl.pointer_type(tl.float32))
    numel = tl.where(g_addr != _NO_GRAD, tl.load(trow + 5), 0)  # no gradient this step: nothing to update
    gi = tl.load(trow + 6)
    info = tl.load(trow + 7)
    row = groups + gi * _NG
    lr, _ = _group_lr(groups, gaddr, gi, None)
    k = tl.load(step_ptr) + 1.0  # this tensor's step count after this update
    s = _rule_scalars(row, k, lr)
    has_state = tl.load(row + _HAS_STATE) != 0.0  # SGD without momentum keeps no buffer

    addrs = (p_addr, g_addr, a_addr, b_addr)
    if start + BLOCK <= numel:
        if ((info & 1) != 0) & (g_addr % 16 == 0):  # p and state aligned (info), and this step's gradient
            _chunk(RULE, DTYPE, BLOCK, SUB, False, True, *addrs, start, numel, s, has_state)
        else:
            _chunk(RULE, DTYPE, BLOCK, _SCALAR_SUB, False, False, *addrs, start, numel, s, has_state)
    elif start < numel:
        _chunk(RULE, DTYPE, BLOCK, _SCALAR_SUB, True, False, *addrs, start, numel, s, has_state)

    # Counters: the last chunk of a tensor advances its step; the last tensor advances the groups.
    # The barrier makes every warp's reads of this step's counters precede the release below (the
    # atomic is one thread's), so no warp can read a counter after another program advanced it.
    tl.debug_barrier()
    chunks_done = tl.atomic_add(done + slot, 1, sem="acq_rel")
    if chunks_done == (info >> 1) - 1:
        tl.store(done + slot, 0)
        if (slot < n_rows - 1) & (g_addr != _NO_GRAD):  # not the sentinel, nor a tensor without a gradient
            tl.store(step_ptr, k)
        rows_done = tl.atomic_add(done + n_rows, 1, sem="acq_rel")
        if rows_done == n_rows - 1:
            tl.store(done + n_rows, 0)
            if advance != 0:  # every group at once: its lr (as every program computed it) and t + 1
                gs = tl.arange(0, GROUPS)
                live = gs < n_groups
                lrs, counters = _group_lr(groups, gaddr, gs, live)
                tl.store(tl.load(gaddr + 2 * gs + 1, mask=live).to(tl.pointer_type(tl.float32)), lrs, mask=live)
                tl.store(counters, tl.load(counters, mask=live) + 1, mask=live)


def sub_tile(dtype: torch.dtype) -> int:
    """Elements per sub-tile: one VECTOR_BYTES access per thread and tensor."""
    return VECTOR_BYTES * 32 * NUM_WARPS // dtype.itemsize


def prepare(rule: str, work: Sequence[GroupWork], cache: dict, grads: GradSource) -> Callable[[], None]:
    plan, table = Plan.for_step(cache, "triton", rule, work, BLOCK, grads)
    return lambda: _launch(plan, table, rule, len(work))


def _launch(plan: Plan, grads: torch.Tensor, rule: str, n_groups: int) -> None:
    last = len(plan.parts) - 1
    for i, part in enumerate(plan.parts):
        _step_kernel[(part.work.shape[0],)](
            part.work, part.tensors, grads, plan.groups, plan.gaddr, part.done, part.tensors.shape[0], n_groups,
            int(i == last), RULE=RULE_ID[rule], DTYPE=_TL_DTYPE[part.dtype], BLOCK=BLOCK, SUB=sub_tile(part.dtype),
            GROUPS=triton.next_power_of_2(n_groups), num_warps=NUM_WARPS)
