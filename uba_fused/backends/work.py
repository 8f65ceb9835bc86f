"""What an optimizer hands a backend: one ``GroupWork`` per param group.

Every backend is a function ``step(rule, work, cache) -> None`` (see
``backends/__init__.py``). It applies ``rule`` to every parameter listed in
``work``, advances each listed parameter's ``step`` and each group's
``schedule_step`` by one, and writes the learning rate it applied into
``lr_out``. ``cache`` is a dict the optimizer owns, where a kernel backend may
keep device tables between steps; the optimizer clears it when storages may
have changed (``load_state_dict``, ``add_param_group``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..schedules import Schedule

RULES = ("adamw", "adabelief", "lion", "sgd")


@dataclass
class GroupWork:
    index: int                     # position in optimizer.param_groups
    hyper: dict[str, Any]          # the param group itself (lr, betas, eps, weight_decay, momentum, ...)
    schedule: Schedule | None      # None: the group's lr is applied as is
    schedule_step: torch.Tensor    # int64 0-dim: step() calls made before this one
    lr_out: torch.Tensor           # float32 0-dim: receives the lr applied by this step
    params: list[torch.Tensor]     # parameters that have a gradient
    grads: list[torch.Tensor]
    steps: list[torch.Tensor]      # float32 0-dim per parameter: updates applied so far
    state: dict[str, list[torch.Tensor]]  # per state name (exp_avg, ...), aligned with params
