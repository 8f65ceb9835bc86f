"""Device tables that let one kernel launch update a whole parameter list (shared by the kernel backends).

A plan is built once per (rule, set of parameters the optimizer hands over: those with a gradient
or with state) and cached in the optimizer. Each step copies only what changed: the gradient
addresses, one int64 per parameter of the optimizer, in one copy (none at all when every gradient
sits where the last step found it, which the caching allocator usually arranges), and the group
rows when a host value changed (a tensor ``lr`` is copied device to device every step).

Every host-to-device copy reads pinned memory (``_host``, ``GradSource.staged``): a copy from
pageable memory may make the host wait, and CUDA-graph capture refuses it. A step captured into a
graph reads the gradient addresses from a table of its own (in the graph's memory pool), refilled by
the graph at every replay from a pinned row the capture keeps (set aside by eager steps, ``GradScan``), so
eager steps and replays never overwrite each other's addresses. The tables hold addresses: every step
first checks that what they were built from is still there (``GradScan.hold`` / ``moved``, run by the
optimizer), and a step on another CUDA stream than the last waits for it (``stream_of_step``).

Tables, all on the parameters' device; their columns are registry.py's (TENSOR_COLS, GROUP_COLS and the
rule's consts), which names them for Triton and generates csrc/registry.h for C++:
  tensors  int64 [n + 1, 9 + S] per tensor: address of p; its gradient's slot in ``grads``; address of
                             its step; numel; group; info (= n_chunks << 1 | p and state 16-byte aligned);
                             the address of its master slot (registry.CODECS; scratch without one); the
                             address of its 8-bit state's block scales (registry.QUANTIZED; scratch without);
                             the address of its per-tensor state (Rule.scalar; scratch without);
                             then the address of each of the rule's S state slots. Row n is a sentinel
                             with no elements, so a launch always has a program that advances the group
                             counters.
  grads    int64 [m + 1]     per parameter of the optimizer (m of them, flat, in group order): the address
                             of its gradient this step, or NO_GRAD; entry m stays NO_GRAD (the sentinel's)
  work     int64 [items, 2]  per program: (tensor row, first element); every tensor has >= 1 chunk
  done     int32 [n + 2]     chunks finished per tensor, and tensors finished (reset by the kernel)
  groups   float64 [G, C]    per group: GROUP_COLS, then the rule's own columns (registry.group_cols)
  gaddr    int64 [G, 3]      per group: addresses of schedule_step (int64), lr_out (float32) and its schedule's
                             table (float32, a Table's factors; 0 for another kind): registry.GROUP_ADDRESSES
  partials float64 [items]   per program: the sum of squares of its chunk of a gradient (the pre-pass)
  squares  float64 [2, items] per program, for a rule that reads per-tensor sums (Rule.reduces): the sums of
                             squares of its chunk of the parameter and of the gradient or of the update's direction
                             (added per row by ``Plan.reduce``)

A step with parameters of several storages (registry.STORAGES: the parameter's dtype, its state's, its codec, its
state's rounding) makes one launch per storage ("part"); only the last launch advances the group counters, so every
launch reads the same step index t (``Plan.launch``). A step whose groups clip gradients (``max_grad_norm``) first
runs a pre-pass (``Plan.grad_sumsq``): one launch per part writes each chunk's sum of squares, one torch.sum adds
them, and the optimizer hands the global norm to the update kernels as a pointer to a float64 on the device. A rule
that reads per-tensor sums (Rule.reduces: LARS's and LAMB's norms) runs a pre-pass of its own (``Plan.reduce``):
launches per part write each chunk's sums of squares of the parameter and of the gradient (two: the gradient pre-pass
on each), or of the parameter and of the update's direction (one: the update kernel computing the direction and
storing only those sums), torch.segment_reduce adds them per row, and the optimizer hands them back (summed over
shards) to the update kernels, which read their row's. A rule that measures at a tensor's first step (Rule.measures:
SGD-SaI) takes its sums with torch ops over the gradients, on the steps that measure (``Plan.reduce``, snr.py); the
update kernels read zeros (``Plan.blank``) on the others, where no tensor's step is its first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _ext
from ..registry import CHUNK, GROUP_ADDRESSES, GROUP_COLS, KIND, NO_GRAD, RULES, STORAGE_IDS, group_cols
from ..schedules import Table
from . import snr
from .projection import projection, tensor_sums
from .work import (Amp, Capture, GradSource, GroupWork, codec_of, dtensor_class, is_dtensor, local,
                   state_rounding_of)

ALIGN = 16  # bytes: what a 128-bit vector access needs
# registry.STORAGES with torch dtypes: (parameter dtype, state dtype, codec, state rounding) -> the kernels' storage id
STORAGE_ID = {(getattr(torch, a), getattr(torch, b), c, r): i for (a, b, c, r), i in STORAGE_IDS.items()}
_LR = GROUP_COLS.index("lr")


class CaptureError(RuntimeError):
    """A rule of CUDA-graph capture was broken; the message names it."""


def _host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor where a copy to ``device`` may read it while the host runs ahead: pinned, for CUDA
    (torch's host allocator reuses the block only after the copies that read it ran)."""
    return t.pin_memory() if device.type == "cuda" else t


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return _host(t, device).to(device, non_blocking=True)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of a contiguous layout, so it can be walked linearly. A tensor of
    no elements is (torch gives a [5, 0] one strides (1, 1))."""
    if t.numel() == 0:
        return True
    expect = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def storage(p: torch.Tensor, states: Sequence[torch.Tensor], codec: str | None,
            rounding: str) -> tuple[torch.dtype, torch.dtype, str, str]:
    """(dtype of p, dtype of its state, its codec, its state's rounding): which kernel walks it (a registry STORAGES
    entry). A parameter without state is read as keeping it in its own dtype, and it and float32 state as rounded to
    nearest (nothing is rounded). Raises if the kernels are not built for it."""
    dtypes = {s.dtype for s in states} or {p.dtype}
    key = (p.dtype, *dtypes, codec, rounding if states and dtypes != {torch.float32} else "nearest")
    if len(dtypes) > 1 or key not in STORAGE_ID:
        raise RuntimeError(f"a {p.dtype} parameter with state of dtypes {sorted(map(str, dtypes))}, kept as "
                           f"{codec!r}, its state rounded {key[-1]!r}: the kernels take a parameter's state in its own "
                           f"dtype, in float32 for a 16-bit parameter, in bfloat16 for a float32 one or in 8 bits for "
                           f"a float32 or bfloat16 one, master_weights for 16-bit parameters only, and round state "
                           f"stochastically only in bfloat16 or 8 bits")
    return key


def group_row(rule: str, w: GroupWork) -> tuple[float, ...]:
    """The host values of one group's row (lr is 0 here when it is a tensor; it is copied on the device)."""
    h = w.hyper
    lr = 0.0 if isinstance(h["lr"], torch.Tensor) else float(h["lr"])
    kind, warmup, total, min_ratio, phi = (w.schedule.kernel_constants() if w.schedule is not None
                                           else (KIND["constant"], 0.0, 1.0, 0.0, 2.0))
    max_grad_norm, clip_eps = RULES[rule].clipping(h)
    values = dict(lr=lr, kind=float(kind), warmup=warmup, total=total, min_ratio=min_ratio, phi=phi,
                  has_state=float(bool(w.state)), max_grad_norm=max_grad_norm, clip_eps=clip_eps,
                  seed=float(h.get("seed", 0)))
    return tuple(values[c] for c in GROUP_COLS) + RULES[rule].row(h)


def group_addresses(w: GroupWork) -> list[int]:
    """One group's row of Plan.gaddr (registry.GROUP_ADDRESSES)."""
    table = w.schedule.factors.data_ptr() if isinstance(w.schedule, Table) else 0
    return [w.schedule_step.data_ptr(), w.lr_out.data_ptr(), table]


def work_items(n_chunks: list[int], block: int) -> torch.Tensor:
    """(row, first element) of every chunk of every row, row by row: int64 [sum(n_chunks), 2].
    Built with tensor ops: a GPT-2-medium list has 87K chunks, which a Python loop took 60 ms to list."""
    counts = torch.tensor(n_chunks, dtype=torch.int64)
    row = torch.repeat_interleave(torch.arange(len(n_chunks)), counts)
    first_of_row = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.stack([row, (torch.arange(len(row)) - first_of_row) * block], 1)


@dataclass
class Part:
    """The tensors of one storage (their dtype, their state's, their codec) and state rounding: one launch."""

    dtype: torch.dtype
    state_dtype: torch.dtype
    codec: str
    state_rounding: str  # registry.STATE_ROUNDINGS: how its 16-bit state is written ("nearest" for float32 state)
    tensors: torch.Tensor
    work: torch.Tensor
    done: torch.Tensor
    partials: torch.Tensor  # float64 [items]: a pre-pass's sum per work item (a view of Plan.partials)
    squares: torch.Tensor | None  # float64 [2, items]: the per-tensor pre-pass's sums per work item, of the
                                  # parameter and of the gradient or direction (Rule.reduces; None for a rule without)
    lengths: torch.Tensor   # int64 [rows]: each row's work items
    first_row: int          # its first row in Plan.reduce's rows (the parts' rows one after another)
    rows: Rows | None = None  # a rule that projects per row (Rule.projects): its tensors' rows
    members: list[tuple[int, int]] = field(default_factory=list)  # its tensors': (group in the work, index in it)


@dataclass
class Rows:
    """The rows (index along dim 0; one for a tensor of under 2 dims) of a part's tensors, for a rule that projects
    (Rule.projects, projection.py): the direction pre-pass walks them row by row, so that each of its work items
    lies in one row, and the update reads each row's coefficient."""

    work: torch.Tensor         # int64 [items, 2]: (tensor row, first element) of each row's chunks, row by row
    lengths: torch.Tensor      # int64 [rows]: each row's work items
    per_tensor: torch.Tensor   # int64 [tensor rows]: each tensor's rows (the sentinel's: 0)
    groups: torch.Tensor       # int64 [tensor rows]: each tensor's group
    projected: torch.Tensor    # bool [tensor rows]: of 2 dims or more
    meta: torch.Tensor         # float64 [tensor rows, 4]: row length, first row (in coefs), decay factor (each step), 0
    coefs: torch.Tensor        # float32 [rows]: each row's coefficient this step (projection.projection)
    squares: torch.Tensor      # float64 [4, items]: the pre-pass's sums per item (registry.PROJECTION)
    sums: torch.Tensor | None = None  # float64 [rows, 4]: this step's, per row (Plan.reduce)


def row_count(p: torch.Tensor) -> int:
    """How many rows a projecting rule sums over: dim 0's size, or 1 for a tensor of under 2 dims."""
    return p.shape[0] if p.dim() > 1 else 1


def check_rows(p: torch.Tensor, what: str, rule: str) -> None:
    """Raise unless each row of ``p`` (Rows) is one block of memory: dim 0 outermost (its stride the row length)."""
    rows = row_count(p)
    if p.dim() > 1 and p.numel() // max(rows, 1) >= 2**31 - 2 * CHUNK:
        raise ValueError(f"{what}: uba_fused's {rule} in backends 'triton' and 'cuda' takes rows (dim 0) of fewer than "
                         f"2^31 - {2 * CHUNK} elements, and this one of shape {tuple(p.shape)} has rows of "
                         f"{p.numel() // rows}: use backend='torch' or 'cpu'")
    if p.dim() > 1 and rows > 1 and p.numel() and p.stride(0) != p.numel() // rows:
        raise ValueError(f"{what}: uba_fused's {rule} sums each row (dim 0) of a parameter in one block of memory in "
                         f"backends 'triton' and 'cuda', and this one of shape {tuple(p.shape)} has strides "
                         f"{p.stride()} (dim 0 is not outermost: a transposed view?). Make it contiguous, or use "
                         f"backend='torch' or 'cpu'")


def _rows(part_params: list[torch.Tensor], block: int, device: torch.device, group_of: list[int]) -> Rows:
    """Rows of a part's tensors (and the sentinel's none), built with tensor ops (an embedding has 50K rows)."""
    counts = [row_count(p) for p in part_params] + [0]
    row_len = [p.numel() // n if n else 0 for p, n in zip(part_params, counts)] + [0]
    per_row_items = [-(-c // block) for c in row_len]  # a row of 0 elements has no item
    counts_t = torch.tensor(counts, dtype=torch.int64)
    lengths = torch.repeat_interleave(torch.tensor(per_row_items, dtype=torch.int64), counts_t)
    tensor_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    first_row = torch.cumsum(counts_t, 0) - counts_t
    row_in_tensor = torch.arange(len(tensor_of_row)) - first_row[tensor_of_row]
    item_row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    first_item = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(len(item_row)) - first_item[item_row]
    len_t = torch.tensor(row_len, dtype=torch.int64)
    work = torch.stack([tensor_of_row[item_row], row_in_tensor[item_row] * len_t[tensor_of_row[item_row]]
                        + within * block], 1)
    meta = torch.stack([len_t.double(), first_row.double(), torch.ones(len(counts), dtype=torch.float64),
                        torch.zeros(len(counts), dtype=torch.float64)], 1)
    projected = torch.tensor([p.dim() > 1 for p in part_params] + [False])
    return Rows(_to_device(work, device), _to_device(lengths, device), _to_device(counts_t, device),
                _to_device(torch.tensor(group_of + [0], dtype=torch.int64), device), _to_device(projected, device),
                _to_device(meta, device), torch.zeros(max(1, int(counts_t.sum())), dtype=torch.float32, device=device),
                torch.zeros(4, len(item_row), dtype=torch.float64, device=device))


@dataclass
class Plan:
    key: tuple
    device: torch.device
    parts: list[Part]
    groups: torch.Tensor
    gaddr: torch.Tensor
    grads: torch.Tensor                     # the gradient table of eager steps (captured steps own theirs)
    row_sigs: list[tuple]                   # signatures of the group rows last uploaded
    scratch: torch.Tensor                   # where the sentinel row and absent state point; never written
    lists: list[list[torch.Tensor]]         # the params lists the key names by id
    partials: torch.Tensor                  # float64 [items of every part]: the pre-pass's sums
    no_amp: tuple[torch.Tensor, torch.Tensor]  # float32 [1] each: grad_scale 1 and found_inf 0, without a scaler
    tables: list[torch.Tensor] = field(default_factory=list)  # the groups' Table schedules' factors (gaddr's)
    blank: torch.Tensor | None = None       # a rule that measures (Rule.measures): float64 [rows, 3] zeros, the sums
                                            # its update reads on a step that does not measure
    stream_key: tuple | None = None         # the CUDA stream of its last launches: (id, device index, device type)
    streams_seen: set = field(default_factory=set)  # the streams whose use record_stream marked

    @property
    def rule(self) -> str:
        return self.key[0]

    def launch(self, part_launch: Callable[[Part, bool], None]) -> None:
        """One launch per part (storage): ``part_launch(part, advance)``; only the last one advances the group
        counters (``advance``), so every launch reads the same step index."""
        for i, part in enumerate(self.parts):
            part_launch(part, i == len(self.parts) - 1)

    def reduce(self, sumsq: Callable[[Part, torch.Tensor, bool], None], direction: Callable[[Part], None],
               work: Sequence[GroupWork]) -> torch.Tensor:
        """The per-tensor pre-pass (Rule.reduces): float64 [rows of every part, 2], each row's sums of squares of its
        parameter and of its gradient or its update's direction. Per part, into ``part.squares``: ``sumsq(part,
        out, param)``, the gradient pre-pass, writes each work item's sum of the parameter's squares (``param``) or
        of the gradient's; or ``direction(part)``, the update kernel computing the direction (Rule.reduces_direction),
        writes both. torch.segment_reduce adds a row's items one after another in their order, so a step gives the
        same sums every run (no atomics). A rule that measures (Rule.measures): each gradient's moments (snr.moments,
        from ``work``'s gradients: torch ops, on the steps that measure only), [rows of every part, 3]."""
        if RULES[self.rule].measures:
            return snr.moments([None if m is None else work[m[0]].grads[m[1]]
                                for part in self.parts for m in (*part.members, None)], self.device)
        out = []
        for part in self.parts:
            if part.rows is not None:  # per row (Rule.projects): then tensor_sums of each tensor's rows
                rows, cols = part.rows, group_cols(self.rule)
                direction(part)
                rows.sums = torch.segment_reduce(rows.squares.t(), "sum", lengths=rows.lengths, axis=0, unsafe=True)
                consts = self.groups[rows.groups]
                out.append(tensor_sums(rows.sums, rows.per_tensor, rows.meta[:, 0],
                                       consts[:, cols.index("delta")], consts[:, cols.index("eps")]))
                continue
            if RULES[self.rule].reduces_direction:
                direction(part)
            else:
                sumsq(part, part.squares[0], True)
                sumsq(part, part.squares[1], False)
            out.append(torch.segment_reduce(part.squares.t(), "sum", lengths=part.lengths, axis=0, unsafe=True))
        return torch.cat(out)

    def project(self, sums: torch.Tensor) -> None:
        """A rule that projects per row (Rule.projects): from each tensor's sums over its shards (``sums``, what
        ``reduce`` returned, summed over shards) and its rows' sums of this step (``reduce``'s), each row's coefficient
        and each tensor's decay factor (projection.projection), where the update kernels read them (Rows.coefs,
        Rows.meta)."""
        cols = group_cols(self.rule)
        for part in self.parts:
            rows = part.rows
            consts = self.groups[rows.groups]
            coef, factor = projection(self.sums_of(part, sums), rows.sums, rows.per_tensor,
                                      *(consts[:, cols.index(n)] for n in ("delta", "eps", "wd_ratio")),
                                      rows.projected)
            rows.coefs[:coef.shape[0]].copy_(coef)
            rows.meta[:, 2].copy_(factor)

    def sums_of(self, part: Part, sums: torch.Tensor | None) -> torch.Tensor:
        """``part``'s rows of ``sums`` (what ``reduce`` returned, summed over shards), or scratch without them."""
        if sums is None:
            if self.blank is None:
                return self.scratch
            sums = self.blank
        return sums[part.first_row:part.first_row + part.tensors.shape[0]]

    def grad_sumsq(self, part_sumsq: Callable[[Part], None], per_row: bool = False) -> torch.Tensor:
        """The pre-pass: the sum of the squares of this step's gradients, a float64 0-dim tensor on the device.
        ``part_sumsq(part)`` launches a kernel that writes each work item's sum into ``part.partials``; one
        torch.sum adds them all in a fixed order, so a step gives the same sum every run (atomics would not).
        ``per_row``: each row's sum (``slots``), float64 [rows of every part], added by torch.segment_reduce."""
        for part in self.parts:
            part_sumsq(part)
        if not per_row:
            return self.partials.sum()
        return torch.cat([torch.segment_reduce(part.partials, "sum", lengths=part.lengths, unsafe=True)
                          for part in self.parts])

    def slots(self, work: Sequence[GroupWork]) -> list[int]:
        """Each row's parameter (``reduce``'s rows, and ``grad_sumsq``'s): its position in the optimizer's flat order;
        -1 for a part's sentinel row."""
        return [s for part in self.parts for s in [work[wi].slots[i] for wi, i in part.members] + [-1]]

    @staticmethod
    def key_of(rule: str, work: Sequence[GroupWork]) -> tuple:
        # The optimizer hands the same params list object while its selection of params holds
        # (see backends/step.py: _selection); a plan keeps those lists alive (``lists``),
        # so their ids cannot be reused while it is cached.
        return (rule,) + tuple((w.index, id(w.params)) for w in work)

    @classmethod
    def for_step(cls, plans: dict[str, Plan], name: str, rule: str, work: Sequence[GroupWork], block: int,
                 source: GradSource) -> tuple[Plan, torch.Tensor]:
        """The plan of backend ``name`` for this selection (built if none is cached in ``plans``, StepCache.plans)
        with its group rows current, and the gradient table its kernels read this step, current too. Never
        syncs."""
        plan = plans.get(name)
        built = plan is None or plan.key != cls.key_of(rule, work)
        if built:
            if source.capture is not None:
                raise CaptureError("CUDA-graph capture of step() found no device tables for these parameters (none "
                                   "built yet, or a state dict loaded since): run eager steps before capturing, with "
                                   "the same parameters receiving gradients (PyTorch's recipe warms up on a side "
                                   "stream)")
            plan = plans[name] = cls.build(rule, work, block, len(source.addresses))
        plan.enter_stream(work)
        plan.upload_rows(work, source.capture)
        table = plan.grads
        if source.capture is not None:
            # The graph's own table: written and read within each replay, in the graph's memory pool. The plan's
            # tables outlive any rebuild while the graph may replay.
            table = torch.empty_like(plan.grads)
            source.capture.keep.append(plan)
        if built or source.changed or source.capture is not None:
            table.copy_(source.staged(plan.device), non_blocking=True)
        return plan, table

    @classmethod
    def build(cls, rule: str, work: Sequence[GroupWork], block: int, n_slots: int) -> Plan:
        device = work[0].schedule_step.device
        scratch = torch.zeros(ALIGN, dtype=torch.float64, device=device)
        n_states = len(RULES[rule].states)
        by_storage: dict[tuple[torch.dtype, torch.dtype, str, str], list[tuple[int, int]]] = {}
        for wi, w in enumerate(work):
            for i, p in enumerate(w.params):
                key = storage(p, [w.state[n][i] for n in w.state], codec_of(w.hyper, p), state_rounding_of(w.hyper))
                by_storage.setdefault(key, []).append((wi, i))
        if not by_storage:
            by_storage[torch.float32, torch.float32, "nearest", "nearest"] = []
        specs = []  # per part: (storage, table rows, chunks per row)
        projects = RULES[rule].projects
        for key, members in by_storage.items():
            rows, chunks = [], []
            for wi, i in members:
                w = work[wi]
                p = w.params[i]
                if projects:
                    check_rows(p, f"param_groups[{w.index}]['params'][{i}]", rule)
                # a group that keeps no state (SGD without momentum) points its slots at scratch: never read
                states = [w.state[n][i].data_ptr() for n in w.state] or [scratch.data_ptr()] * n_states
                master, absmax, scalar = (scratch.data_ptr() if t is None else t.data_ptr()
                                          for t in (w.masters[i], w.scales[i], w.scalars and w.scalars[i]))
                # the gradient's alignment is checked each step
                aligned = all(x % ALIGN == 0 for x in [p.data_ptr(), master, *states] if x)
                chunks.append(max(1, -(-p.numel() // block)))
                rows.append([p.data_ptr(), w.slots[i], w.steps[i].data_ptr(), p.numel(), wi,
                             chunks[-1] << 1 | int(aligned), master, absmax, scalar, *states])
            s = scratch.data_ptr()
            rows.append([s, n_slots - 1, s, 0, 0, 1 << 1, s, s, s] + [s] * n_states)  # the sentinel: slot NO_GRAD
            specs.append((key, rows, chunks + [1]))
        items = [sum(chunks) for *_, chunks in specs]
        partials = torch.zeros(sum(items), dtype=torch.float64, device=device)
        squares = (torch.zeros(2, sum(items), dtype=torch.float64, device=device).split(items, 1)
                   if RULES[rule].reduces and not projects else [None] * len(specs))  # (Rows.squares: per row)
        first_rows = [sum(len(rows) for _, rows, _ in specs[:i]) for i in range(len(specs))]
        parts = [Part(*key, _to_device(torch.tensor(rows, dtype=torch.int64), device),
                      _to_device(work_items(chunks, block), device),
                      torch.zeros(len(rows) + 1, dtype=torch.int32, device=device), view, sq,
                      _to_device(torch.tensor(chunks, dtype=torch.int64), device), first,
                      _rows([work[wi].params[i] for wi, i in by_storage[key]], block, device,
                            [wi for wi, _ in by_storage[key]]) if projects else None, by_storage[key])
                 for (key, rows, chunks), view, sq, first in zip(specs, partials.split(items), squares, first_rows)]
        blank = (torch.zeros(sum(len(rows) for _, rows, _ in specs), 3, dtype=torch.float64, device=device)
                 if RULES[rule].measures else None)
        # (the group rows and addresses are written by the first upload_rows, as whenever a group changes)
        return cls(cls.key_of(rule, work), device, parts,
                   torch.zeros(len(work), len(group_cols(rule)), dtype=torch.float64, device=device),
                   torch.zeros(len(work), len(GROUP_ADDRESSES), dtype=torch.int64, device=device),
                   torch.full((n_slots,), NO_GRAD, dtype=torch.int64, device=device), [],
                   scratch, [w.params for w in work], partials, tuple(_to_device(torch.tensor([1.0, 0.0]),
                                                                                  device).split(1)), blank=blank)

    def amp_args(self, amp: Amp | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernels' ``grad_scale`` and ``found_inf``: GradScaler's (``amp``), as one-element float32 tensors on
        this plan's device, or 1 and 0 without it."""
        if amp is None:
            return self.no_amp
        return tuple(none if t is None else t.reshape(1).to(self.device, torch.float32, non_blocking=True)
                     for t, none in zip((amp.grad_scale, amp.found_inf), self.no_amp))

    def on_device(self) -> contextlib.AbstractContextManager:
        """Where launches that take the current device (Triton's) must run: under the parameters' CUDA device, so
        that they run there, on its current stream, whatever device is current (the CUDA binding guards itself)."""
        if self.device.type != "cuda" or torch.cuda.current_device() == self.device.index:
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    def enter_stream(self, work: Sequence[GroupWork]) -> None:
        """Before a step's launches on a CUDA stream other than this plan's last one (a warm-up on a side stream,
        then the main one; a capture's own stream): reset the ``done`` counters, so that a step after an
        unordered one (a graph replayed on another stream at the same time as a step), which leaves them
        non-zero and would freeze every later step's counters, starts right again; under capture the reset
        becomes part of the graph. (The optimizer has made this stream wait for the last step's:
        ``stream_of_step``.) The first time on a stream, also mark every table and state tensor as used there
        (``record_stream``): the caching allocator then hands their memory on, once they are freed (a plan
        rebuilt, a state dict loaded), only after that stream's queued kernels ran."""
        if self.device.type != "cuda":
            return
        key = torch._C._cuda_getCurrentStream(self.device.index)
        if key == self.stream_key:
            return
        for part in self.parts:
            part.done.zero_()
        if key not in self.streams_seen:
            self.streams_seen.add(key)
            stream = _stream(key)
            for t in self.tensors_used(work):
                t.record_stream(stream)
        self.stream_key = key

    def tensors_used(self, work: Sequence[GroupWork]) -> list[torch.Tensor]:
        """Every device tensor a launch of this plan reads or writes, but the parameters and gradients."""
        out = [self.groups, self.gaddr, self.grads, self.scratch, self.partials, *self.no_amp, *self.tables]
        if self.blank is not None:
            out.append(self.blank)
        for part in self.parts:
            out += [part.tensors, part.work, part.done, part.lengths]
            if part.squares is not None:
                out.append(part.squares)
            if part.rows is not None:
                r = part.rows
                out += [r.work, r.lengths, r.per_tensor, r.groups, r.projected, r.meta, r.coefs, r.squares]
        for w in work:
            out += [w.schedule_step, w.lr_out, *w.steps, *(m for m in w.masters + w.scales if m is not None),
                    *(w.scalars or [])]
            for ts in w.state.values():
                out += ts
        return out

    def upload_rows(self, work: Sequence[GroupWork], capture: Capture | None) -> None:
        """The group rows, uploaded when a group's host values changed (a torch scheduler's lr, say);
        a tensor lr copied on the device every step, so that a graph's replays read its current value."""
        sigs = [w.signature for w in work]
        if sigs != self.row_sigs:
            if capture is not None:
                changed = [w.index for w, a, b in zip(work, sigs, self.row_sigs) if a != b]
                raise CaptureError(f"param_groups{changed}: hyper-parameters changed since the last eager step, "
                                   f"during CUDA-graph capture; change them before the warm-up steps (a tensor lr "
                                   f"may change any time, by fill_)")
            rows = torch.tensor([group_row(self.rule, w) for w in work], dtype=torch.float64)
            self.groups.copy_(_host(rows, self.device), non_blocking=True)
            # (a new schedule may be a Table elsewhere: the plan holds the tables its launches read, ``tables``)
            self.tables = [w.schedule.factors for w in work if isinstance(w.schedule, Table)]
            addresses = torch.tensor([group_addresses(w) for w in work], dtype=torch.int64)
            self.gaddr.copy_(_host(addresses, self.device), non_blocking=True)
            self.row_sigs = sigs
        for wi, w in enumerate(work):
            if isinstance(w.hyper["lr"], torch.Tensor):
                self.groups[wi, _LR].copy_(w.hyper["lr"].reshape(()), non_blocking=True)


# Pinned rows of gradient addresses set aside for captured steps at a time: enough for a graph per
# sequence-length bucket, captured one after another with no eager step between (8 bytes per parameter each).
CAPTURE_ROWS = 64


def _pinned_rows(n: int, width: int) -> torch.Tensor:
    return torch.empty((n, width), dtype=torch.int64, pin_memory=True)


def _layout(t: torch.Tensor) -> tuple:
    """Where a tensor's elements are and how they are laid out: what a table row derives from it."""
    return t.data_ptr(), t.dtype, t.device, t.shape, t.stride()


def _stream(key: tuple) -> torch.cuda.Stream:
    """The stream that torch._C._cuda_getCurrentStream(device) answered with ``key`` (id, device index, type)."""
    return torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])


def stream_of_step(devices: Sequence[torch.device], last: dict, capture: Capture | None) -> None:
    """Make each device's current stream wait for the stream of the optimizer's last step there, when they differ,
    so that two steps of one optimizer never overlap (their kernels share counters, and one would read tables the
    other rewrites); ``last`` (device -> (stream key, stream)) is the optimizer's record, updated here. Nothing
    to wait for under capture: torch.cuda.graph synchronizes before it captures. One lookup per device and
    step; a stream is made only when it changed."""
    for device in devices:
        key = torch._C._cuda_getCurrentStream(device.index)
        was = last.get(device)
        if was is not None and was[0] == key:
            continue
        stream = _stream(key)
        if was is not None and capture is None:
            stream.wait_stream(was[1])
        last[device] = (key, stream)


class GradScan:
    """The addresses of an optimizer's gradients, step after step, for the kernel backends: one entry per
    parameter in the optimizer's flat order, and a last one, NO_GRAD, for the tables' sentinel row.

    ``steady()`` is the common case: one C++ pass (``uba_fused._C.GradAddresses``) confirms that every
    gradient is present, dense and like its parameter, and says whether any moved since the reference;
    no Python loop visits the parameters. ``full()`` takes any gradients: a C++ pass too where the
    extension is built, with Python only to explain a mismatch or copy a gradient into its parameter's
    layout; the whole pass in Python where it is not.

    C++ cannot see the local shard behind a DTensor. For DTensor parameters the pass runs over the local
    shards, and Python lists their gradients' local shards for it (``_shard_grads``): a gradient that
    shares its parameter's DTensorSpec object, as FSDP2's do, is placed like it, so the common step costs
    three attribute reads per parameter in Python; any other goes to ``full()``, which checks it all."""

    UNCHANGED, MOVED, OTHER = 0, 1, 2  # what GradAddresses.scan answers

    def __init__(self, params: list[torch.Tensor]):
        self.params = [local(p) for p in params]
        self._owners = params if any(map(is_dtensor, params)) else None  # whose .grad holds the shards
        self.addresses = torch.full((len(params) + 1,), NO_GRAD, dtype=torch.int64)
        self._scan_out = self.addresses[:-1]
        c = getattr(_ext._C, "GradAddresses", None)
        self._c = c(self.params) if c is not None else None
        self._recorded = False
        self._cuda = any(p.is_cuda for p in params)
        # Pinned rows set aside for captured steps (each keeps one; allocating inside a capture may be refused),
        # and the rows captures took, by their addresses: a capture that finds the same addresses shares one.
        self._rows: torch.Tensor | None = None
        self._next_row = 0
        self._taken: dict[bytes, torch.Tensor] = {}
        self._held: tuple[list, list] = ([], [])  # hold() without the extension: ((tensor, layout), entries)

    def hold(self, tensors: list[torch.Tensor], entries: list[tuple[dict, Any, Any]]) -> None:
        """Record what the tables were built from: each tensor's address and layout, and each (dict, key, value)
        entry (``moved`` checks them). One C++ pass where the extension is built."""
        if self._c is not None:
            self._c.hold(tensors, entries)
        else:
            self._held = ([(t, _layout(t)) for t in tensors], list(entries))

    def moved(self) -> int:
        """The index of the first tensor (then entry) given to ``hold`` that is not as it was: moved to other
        memory, of another dtype or layout, or no longer the value of its dict entry; -1 if all are as they were."""
        if self._c is not None:
            return self._c.moved()
        tensors, entries = self._held
        for i, (t, was) in enumerate(tensors):
            if _layout(t) != was:
                return i
        for i, (d, key, value) in enumerate(entries):
            if d.get(key) is not value:
                return len(tensors) + i
        return -1

    def steady(self, capture: Capture | None) -> GradSource | None:
        """This step's gradients, if one C++ pass can vouch for them all; else None (take ``full()``)."""
        if self._c is None or not self._recorded:
            return None
        grads = None
        if self._owners is not None:
            grads = self._shard_grads()
            if grads is None:
                return None
        status = self._c.scan(self._scan_out, grads)
        return None if status == self.OTHER else self._source(self.addresses, status == self.MOVED, capture, [])

    def vouch(self) -> bool:
        """Whether one C++ pass finds every gradient present, dense, and laid out, typed and placed as its
        parameter, so that no Python check need visit them (backends "torch" and "cpu"); False where the pass
        cannot tell (no extension, DTensor parameters) or finds one that is not."""
        return self._c is not None and self._owners is None and self._c.scan(self._scan_out, None) != self.OTHER

    def full(self, capture: Capture | None, check: Callable[[], None], grads: list[torch.Tensor | None]) -> GradSource:
        """From the gradients themselves (``grads``: each parameter's ``.grad``, a DTensor's local shard),
        whatever they are; ``check()`` raises saying which gradient is not dense and shaped, typed and placed
        like its parameter (called when one is found: C++ finds it, or first of all without it). One laid out
        unlike its parameter is walked as a copy in the parameter's layout."""
        addresses = torch.full((len(self.params) + 1,), NO_GRAD, dtype=torch.int64)
        if self._c is not None:
            if self._owners is not None:  # C++ sees the local shards only: placements are checked here
                check()
            bad, relayout = self._c.collect(addresses[:-1], None if self._owners is None else grads)
            if bad >= 0:
                check()
                raise RuntimeError(f"the gradient of parameter {bad} (in the optimizer's order) does not match it")
        else:
            check()
            relayout = [i for i, (p, g) in enumerate(zip(self.params, grads))
                        if g is not None and g.stride() != p.stride()]
            addresses[:-1] = torch.tensor([NO_GRAD if g is None else g.data_ptr() for g in grads], dtype=torch.int64)
        keep = []
        for i in relayout:
            keep.append(torch.empty_like(self.params[i]).copy_(grads[i]))
            addresses[i] = keep[-1].data_ptr()
        return self._source(addresses, True, capture, keep)

    def _shard_grads(self) -> list[torch.Tensor] | None:
        """The gradients' local shards, if every parameter has a gradient, a DTensor's with the parameter's own
        DTensorSpec object and the same local tensor as when the scan was built; else None."""
        cls, out = dtensor_class(), []
        for p, shard in zip(self._owners, self.params):
            g = p.grad
            if g is None:
                return None
            if isinstance(p, cls):
                if g._spec is not p._spec or p._local_tensor is not shard:
                    return None
                g = g._local_tensor
            out.append(g)
        return out

    def _source(self, addresses: torch.Tensor, changed: bool, capture: Capture | None, keep: list) -> GradSource:
        source = GradSource(addresses, changed, capture, keep)
        if capture is not None and self._cuda:
            source.pinned = self._capture_row(addresses)
            capture.keep.append(source.pinned)
        return source

    def _capture_row(self, addresses: torch.Tensor) -> torch.Tensor:
        """A pinned row holding ``addresses`` for a captured step's copy to read at every replay: one a capture
        with the same addresses took already, else the next row set aside (a host copy: nothing for the capture
        to refuse). Rows are set aside CAPTURE_ROWS at a time, after eager steps; past them, a capture asks
        torch's host allocator, which a capture may refuse."""
        key = addresses.numpy().tobytes()
        row = self._taken.get(key)
        if row is None:
            if self._rows is not None and self._next_row < len(self._rows):
                row = self._rows[self._next_row].copy_(addresses)
                self._next_row += 1
            else:
                try:
                    row = addresses.pin_memory()
                except RuntimeError as exc:
                    raise CaptureError(f"CUDA-graph capture of step() needs a pinned block for the gradients' "
                                       f"addresses, and the {CAPTURE_ROWS} set aside were taken by captures since "
                                       f"the last eager step; pinning another during the capture failed ({exc}). "
                                       f"Run an eager step between every {CAPTURE_ROWS} captures") from None
            self._taken[key] = row
        return row

    def after_eager_step(self, grads: GradSource | None) -> None:
        """The addresses just copied into the plans' own tables are the reference of the next ``steady()``;
        and pinned rows are set aside for steps that CUDA graphs may capture next."""
        if grads is not None and grads.changed and self._c is not None:
            self._c.record()
            self._recorded = True
        if self._cuda and (self._rows is None or self._next_row == len(self._rows)):
            self._rows = _pinned_rows(CAPTURE_ROWS, len(self.addresses))
            self._next_row = 0

    def after_captured_step(self) -> None:
        """Those addresses went to the graph's own table, not to the plans': the next eager step copies its own."""
        self._recorded = False
