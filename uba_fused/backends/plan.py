"""Device tables that let one kernel launch update a whole parameter list (shared by the kernel backends).

A plan is built once per (rule, set of parameters the optimizer hands over: those with a gradient
or with state) and cached in the optimizer; each step only refreshes what changed: gradient
addresses (NO_GRAD where a parameter has no gradient this step, and the kernels skip its row; new
``.grad`` tensors after ``zero_grad(set_to_none=True)`` usually land at the same addresses, and then
nothing is copied) and the per-group hyper-parameters (copied only when a host value changed; a
tensor ``lr`` is copied device to device every step).

Tables, all on the parameters' device:
  tensors  int64 [n + 1, 8]  per tensor: addresses of p, g (or NO_GRAD), state0, state1, step; numel;
                             group; info (= n_chunks << 1 | aligned). Row n is a sentinel with no elements,
                             so a launch always has a program that advances the group counters.
  work     int64 [items, 2]  per program: (tensor row, first element); every tensor has >= 1 chunk
  done     int32 [n + 2]     chunks finished per tensor, and tensors finished (reset by the kernel)
  groups   float64 [G, 18]   per group: the columns of GROUP_COLS
  gaddr    int64 [G, 2]      per group: addresses of schedule_step (int64) and lr_out (float32)

A step with parameters of several dtypes makes one launch per dtype ("part"); only the last launch
advances the group counters, so every launch reads the same step index t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..schedules import KIND_CONSTANT
from .work import GroupWork

# Columns of the group table. One minus a beta is computed here in float64: in float32,
# 1 - 0.999f is off by 1.3e-5 relative, which the kernels' parity tests see.
GROUP_COLS = ("lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2", "eps",
              "weight_decay", "momentum", "one_minus_dampening", "nesterov", "kind", "warmup", "total",
              "min_ratio", "phi", "has_state")
G = {name: i for i, name in enumerate(GROUP_COLS)}
TENSOR_COLS = 8
NO_GRAD = -1  # the gradient address of a row without a gradient this step (an empty tensor's address is 0)
ALIGN = 16  # bytes: what a 128-bit vector access needs


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of a contiguous layout, so it can be walked linearly."""
    expect = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _log(b: float) -> float:
    return math.log(b) if b > 0 else -math.inf


def group_row(w: GroupWork) -> tuple[float, ...]:
    """The host values of one group's row (lr is 0 here when it is a tensor; it is copied on the device)."""
    h = w.hyper
    b1, b2 = h.get("betas", (0.0, 0.0))
    lr = 0.0 if isinstance(h["lr"], torch.Tensor) else float(h["lr"])
    kind, warmup, total, min_ratio, phi = (w.schedule.kernel_constants() if w.schedule is not None
                                           else (KIND_CONSTANT, 0.0, 1.0, 0.0, 2.0))
    values = dict(lr=lr, beta1=b1, beta2=b2, one_minus_beta1=1.0 - b1, one_minus_beta2=1.0 - b2,
                  log_beta1=_log(b1), log_beta2=_log(b2), eps=float(h.get("eps", 0.0)),
                  weight_decay=float(h["weight_decay"]), momentum=float(h.get("momentum", 0.0)),
                  one_minus_dampening=1.0 - float(h.get("dampening", 0.0)), nesterov=float(bool(h.get("nesterov"))),
                  kind=float(kind), warmup=warmup, total=total, min_ratio=min_ratio, phi=phi,
                  has_state=float(bool(w.state)))
    return tuple(values[c] for c in GROUP_COLS)


def work_items(n_chunks: list[int], block: int) -> torch.Tensor:
    """(row, first element) of every chunk of every row, row by row: int64 [sum(n_chunks), 2].
    Built with tensor ops: a GPT-2-medium list has 87K chunks, which a Python loop took 60 ms to list."""
    counts = torch.tensor(n_chunks, dtype=torch.int64)
    row = torch.repeat_interleave(torch.arange(len(n_chunks)), counts)
    first_of_row = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.stack([row, (torch.arange(len(row)) - first_of_row) * block], 1)


@dataclass
class Part:
    """The tensors of one dtype: one launch."""

    dtype: torch.dtype
    members: list[tuple[int, int]]          # (position in work, index in that GroupWork)
    tensors: torch.Tensor
    work: torch.Tensor
    done: torch.Tensor
    info: torch.Tensor                      # host copy of the info column (int64), gradients not yet counted
    params: list[torch.Tensor]
    flat_index: list[int] | None            # positions in the flat gradient list; None: all, in order
    grad_ptrs: list[int] | None = None


@dataclass
class Plan:
    key: tuple
    device: torch.device
    parts: list[Part]
    groups: torch.Tensor
    gaddr: torch.Tensor
    row_sigs: list[tuple]                   # signatures of the group rows last uploaded
    scratch: torch.Tensor                   # where the sentinel row and absent state point; never written
    keep: list[torch.Tensor]                # temporaries whose addresses a table holds this step
    lists: list[list[torch.Tensor]]         # the params lists the key names by id

    @staticmethod
    def key_of(rule: str, work: Sequence[GroupWork]) -> tuple:
        # The optimizer hands the same params list object while its selection of params holds
        # (see FusedOptimizer._selection); a plan keeps those lists alive (``lists``),
        # so their ids cannot be reused while it is cached.
        return (rule,) + tuple((w.index, id(w.params)) for w in work)

    @classmethod
    def for_step(cls, cache: dict, name: str, rule: str, work: Sequence[GroupWork], block: int) -> Plan:
        """The plan of backend ``name`` cached for this selection (built if there is none), refreshed."""
        plan = cache.get(name)
        if plan is None or plan.key != cls.key_of(rule, work):
            plan = cache[name] = cls.build(rule, work, block)
        plan.refresh(work)
        return plan

    @classmethod
    def build(cls, rule: str, work: Sequence[GroupWork], block: int) -> Plan:
        device = work[0].schedule_step.device
        scratch = torch.zeros(ALIGN, dtype=torch.float64, device=device)
        by_dtype: dict[torch.dtype, list[tuple[int, int]]] = {}
        flat_of: dict[tuple[int, int], int] = {}
        for wi, w in enumerate(work):
            for i, p in enumerate(w.params):
                by_dtype.setdefault(p.dtype, []).append((wi, i))
                flat_of[wi, i] = len(flat_of)
        if not by_dtype:
            by_dtype[torch.float32] = []
        parts = []
        for dtype, members in by_dtype.items():
            rows, info = [], []
            for wi, i in members:
                w = work[wi]
                p = w.params[i]
                states = [w.state[n][i] for n in w.state]
                ptrs = [p.data_ptr(), 0] + [s.data_ptr() for s in states] + [scratch.data_ptr()] * (2 - len(states))
                aligned = all(x % ALIGN == 0 for x in ptrs if x)  # the gradient is checked at refresh
                n_chunks = max(1, -(-p.numel() // block))
                info.append(n_chunks << 1 | int(aligned))
                rows.append(ptrs + [w.steps[i].data_ptr(), p.numel(), wi, info[-1]])
            s = scratch.data_ptr()
            rows.append([s, s, s, s, s, 0, 0, 1 << 1])
            parts.append(Part(dtype, members,
                              torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
                              work_items([x >> 1 for x in info] + [1], block).to(device, non_blocking=True),
                              torch.zeros(len(members) + 2, dtype=torch.int32, device=device),
                              torch.tensor(info, dtype=torch.int64),
                              [work[wi].params[i] for wi, i in members],
                              None if len(by_dtype) == 1 else [flat_of[m] for m in members]))
        gaddr = torch.tensor([[w.schedule_step.data_ptr(), w.lr_out.data_ptr()] for w in work],
                             dtype=torch.int64).to(device, non_blocking=True)
        plan = cls(cls.key_of(rule, work), device, parts, torch.zeros(len(work), len(GROUP_COLS),
                   dtype=torch.float64, device=device), gaddr, [], scratch, [], [w.params for w in work])
        return plan

    def refresh(self, work: Sequence[GroupWork]) -> None:
        """Bring gradient addresses and group rows up to date; copies only what changed; never syncs."""
        self.keep = []
        if all(w.grads is None for w in work):  # the steady state: addresses known without Python's help
            if work and work[0].grad_ptrs is not None:
                self._set_grad_ptrs(torch.cat([w.grad_ptrs for w in work]))
            flat = None
        else:
            flat = [g for w in work for g in w.grads]
        for part in self.parts if flat is not None else ():
            grads = flat if part.flat_index is None else [flat[j] for j in part.flat_index]
            ptrs = [NO_GRAD if g is None else g.data_ptr() for g in grads]
            if ptrs == part.grad_ptrs:
                continue  # the usual case: the caching allocator hands out the same addresses every step
            part.grad_ptrs = ptrs
            for j, g in enumerate(grads):
                p = part.params[j]
                if g is not None and g.stride() != p.stride():  # a hand-set gradient, another layout: walk a copy
                    grads[j] = torch.empty_like(p).copy_(g)
                    self.keep.append(grads[j])
                    ptrs[j] = grads[j].data_ptr()
                    part.grad_ptrs = None  # compare afresh next step
            self._write_grad_column(part, torch.tensor(ptrs, dtype=torch.int64))
        self._upload_rows(work)

    def _set_grad_ptrs(self, flat: torch.Tensor) -> None:
        """New gradient addresses (int64 CPU, in the order of the plan's params), all laid out like their params."""
        for part in self.parts:
            ptrs = flat if part.flat_index is None else flat[part.flat_index]
            self._write_grad_column(part, ptrs)
            part.grad_ptrs = ptrs.tolist()

    def _write_grad_column(self, part: Part, ptrs: torch.Tensor) -> None:
        """Gradient addresses into the table, and each tensor's aligned bit with its gradient counted."""
        info = part.info & ~1 | (part.info & 1 & (ptrs % ALIGN == 0).long())
        cols = torch.stack([ptrs, info], 1).to(self.device, non_blocking=True)
        part.tensors[:-1, 1].copy_(cols[:, 0])
        part.tensors[:-1, 7].copy_(cols[:, 1])

    def _upload_rows(self, work: Sequence[GroupWork]) -> None:
        sigs = [w.signature for w in work]
        if sigs != self.row_sigs:  # a group's host values changed (a torch scheduler's lr, say): upload its rows
            rows = [group_row(w) for w in work]
            self.groups.copy_(torch.tensor(rows, dtype=torch.float64), non_blocking=True)
            self.row_sigs = sigs
        for wi, w in enumerate(work):
            if isinstance(w.hyper["lr"], torch.Tensor):
                self.groups[wi, G["lr"]].copy_(w.hyper["lr"].reshape(()), non_blocking=True)
