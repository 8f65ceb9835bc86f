"""Sums over the ranks: how each DTensor parameter's shares of a sum (clipping's norm, a rule's per-tensor sums) add
up to the sum of its whole tensor.

A rank holds a local shard of each DTensor parameter. A sum over a tensor (of its squares, say) is the sum of every
rank's share over each mesh dimension that shards it, and over none that replicates it (its replicas hold the same
values, which would be counted once per replica). So each parameter is summed over the process groups of its sharded
mesh dimensions: its class (``Layout.classes``). FSDP2 places every parameter alike (``Shard(0)``; HSDP ``(Replicate(),
Shard(0))``): one class, and the whole sum tensor is all-reduced once per sharded dimension. Tensor parallelism beside
FSDP2 (torchtitan's layout) places them several ways (``Shard(0)``, ``Shard(1)``, ``Replicate()`` on a TP dimension):
several classes, and then each row of a per-row sum tensor (a backend's rows: ``Step.slots``) is summed over its own
parameter's, one all-reduce per class and sharded dimension, of a copy where the other classes' rows are zeros.

Every all-reduce runs on the current stream, in the same order on every rank (classes in the order their first
parameter comes in the optimizer): nothing syncs with the host, and a CUDA graph can capture it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import CaptureError
from .work import is_dtensor


@dataclass
class Layout:
    """DTensor parameters' classes: each the process groups of the mesh dimensions that shard its parameters."""

    classes: list[tuple[Any, ...]]       # per class: process groups, in mesh-dimension order (none: replicated)
    of: list[int]                        # per parameter, in the optimizer's flat order: its class
    placements: list[tuple[Any, ...]]    # the parameters' distinct placements, for errors
    masks: dict = field(default_factory=dict)  # per rows' slots and device: per class a bool [rows] on it

    def rows_of(self, slots: list[int], device: torch.device) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
        """Per class that sums over some group, its groups and which rows (``slots``: each row's parameter, -1 none)
        are of it: a bool [rows] tensor on ``device``, made once per set of rows (the last few are kept: the
        pre-pass's rows, a recorded L1 norm's rows)."""
        key = (tuple(slots), device)
        if key not in self.masks:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise CaptureError("CUDA-graph capture of step() with DTensor parameters placed several ways needs "
                                   "the rows of its sums as an eager step before it had them: run an eager step "
                                   "with the same parameters receiving gradients before capturing")
            of = torch.tensor([self.of[s] if s >= 0 else -1 for s in slots], dtype=torch.int64)
            if device.type == "cuda":  # (a copy the host runs ahead of; no copy from pageable memory in capture)
                of = of.pin_memory()
            of = of.to(device, non_blocking=True)
            if len(self.masks) >= 4:  # (the rows change with the parameters that have gradients: MoE routing)
                self.masks.clear()
            self.masks[key] = [(groups, of == c) for c, groups in enumerate(self.classes) if groups]
        return self.masks[key]


def layout_of(groups: list[dict]) -> Layout | str | None:
    """None if no parameter is a DTensor; their Layout if every one is; else a sentence saying which are not."""
    params = [p for g in groups for p in g["params"]]
    plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
    if len(plain) == len(params):
        return None
    if plain:
        return f"parameters {plain} (in the optimizer's order) are not DTensors, others are"
    classes: dict[tuple, int] = {}
    of = []
    for p in params:
        mesh = p.device_mesh
        # (every placement but Replicate shards: Shard, and _StridedShard, FSDP2's over tensor parallelism's
        # Shard(0), which is_shard() does not count; a Partial parameter is refused when it is given)
        key = tuple(mesh.get_group(d) for d, placement in enumerate(p.placements) if not placement.is_replicate())
        of.append(classes.setdefault(key, len(classes)))
    return Layout(list(classes), of, list(dict.fromkeys(p.placements for p in params)))


def per_row(layout: Layout | str | None) -> bool:
    """Whether sums must come per row (``summed``'s ``slots``): the parameters are of several classes."""
    return isinstance(layout, Layout) and len(layout.classes) > 1


def summed(layout: Layout | None, x: torch.Tensor, slots: Callable[[], list[int]] | None = None) -> torch.Tensor:
    """``x`` (a rank's shares: a sum, or rows of sums, ``slots()`` naming each row's parameter, which ``per_row``
    layouts need) summed over the ranks as each parameter's class says. One class: ``x`` itself, all-reduced in
    place; several: a new tensor."""
    if layout is None:
        return x
    import torch.distributed as dist  # loaded already: the parameters are DTensors

    if not per_row(layout):
        for group in layout.classes[0]:
            dist.all_reduce(x, group=group)
        return x
    for groups, rows in layout.rows_of(slots(), x.device):
        rows = rows.view(-1, *[1] * (x.dim() - 1))
        mine = torch.where(rows, x, 0.0)  # (where, not a product: an inf in another class's row stays there)
        for group in groups:
            dist.all_reduce(mine, group=group)
        x = torch.where(rows, mine, x)
    return x


def total(layout: Layout | None, rows: torch.Tensor, slots: Callable[[], list[int]]) -> torch.Tensor:
    """The sum over dim 0 of ``rows`` (a rank's shares, one row per parameter, ``slots()`` naming each row's parameter)
    over the ranks: each row over its own parameter's ranks where the parameters are of several classes (per_row),
    else one all-reduce of the rank's sum."""
    if per_row(layout):
        return summed(layout, rows, slots).sum(0)
    return summed(layout, rows.sum(0))
