"""What an optimizer keeps between steps (``StepCache``), and what its device tables were built from (``Held``).

Apart from work.py, which plan.py imports: the cache holds plans and a gradient scan, so it imports plan.py, and
nothing it holds imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import GradScan, Plan
from .work import Selection


@dataclass
class StepCache:
    """What an optimizer keeps between steps so that the next one costs less. None of it is state: the
    optimizer drops it whole (``clear``) whenever storages may have changed (a state-dict load, a new param
    group, an FSDP2 shard replaced)."""

    valid: dict[int, tuple] = field(default_factory=dict)  # group index -> the signature last found valid
    selections: dict[tuple, Selection] = field(default_factory=dict)  # (group index, mask, state names) ->
    scan: GradScan | None = None          # where the gradients were last step (one C++ pass per step)
    shards: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # each DTensor parameter, its local shard
    plans: dict[str, Plan] = field(default_factory=dict)  # kernel backend name -> its device tables
    host: dict[tuple, Any] = field(default_factory=dict)  # backend "cpu": lists derived from a selection
    layout: tuple | None = None           # (what clipping all-reduces over,) once a clipping step found it
    held: Held | None = None              # what the tables and selections were built from, checked every step
    fresh: bool = False                   # this step made or replaced state: record what is held after it
    unmeasured: Any = True                # a rule that measures at a tensor's first step (Rule.measures): whether
                                          # some tensor may not have taken its step yet (snr.unmeasured)

    def clear(self) -> None:
        vars(self).update(vars(StepCache()))


@dataclass
class Held:
    """What the device tables and the cached selections were built from, recorded after the step that built them
    (``GradScan.hold``) and checked at the start of every step (``GradScan.moved``): each parameter whose address
    a table holds, with its layout, and each dict entry that names a state buffer, a step count or a schedule
    counter. ``labels`` says what each is (tensors first, then entries), for errors. ``storages`` keeps the
    memory of those buffers and counters alive for as long as the tables may write it; ``state`` is the
    optimizer's ``state`` mapping and ``version`` its count of changed entries then."""

    tensors: list[torch.Tensor]
    labels: list[str]
    storages: list[torch.UntypedStorage]
    state: Any
    version: int
