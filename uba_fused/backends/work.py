"""What an optimizer hands a backend: one ``GroupWork`` per param group.

Every backend is a function ``prepare(rule, work, cache) -> launch`` (see ``backends/__init__.py``).
``prepare`` checks and builds whatever can fail, touching no parameter or state; the ``launch`` it
returns applies ``rule`` to every parameter listed in ``work`` that has a gradient (one whose
gradient is None is left as it is), advances those parameters' ``step`` and each group's
``schedule_step`` by one, and writes the learning rate it applied into ``lr_out``. The optimizer
has checked the gradients (``check_grads``) and prepares every backend before it launches any, so
an error leaves nothing half-updated. ``cache``
is a dict the optimizer owns, where a kernel backend keeps device tables between steps; the
optimizer clears it when storages may have changed (``load_state_dict``, ``add_param_group``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..schedules import Schedule

RULES = ("adamw", "adabelief", "lion", "sgd")
RULE_ID = {rule: i for i, rule in enumerate(RULES)}  # the kernels' rule numbers (csrc/tables.h: Rule)


@dataclass
class GroupWork:
    index: int                     # position in optimizer.param_groups
    hyper: dict[str, Any]          # the param group itself (lr, betas, eps, weight_decay, momentum, ...)
    schedule: Schedule | None      # None: the group's lr is applied as is
    schedule_step: torch.Tensor    # int64 0-dim: step() calls made before this one
    lr_out: torch.Tensor           # float32 0-dim: receives the lr applied by this step
    params: list[torch.Tensor]     # "torch": the parameters that have a gradient; kernel backends: also
                                   # those that have state but no gradient this step (grads[i] is None)
    grads: list[torch.Tensor | None] | None  # aligned with params; None (kernel backends): the gradients'
                                   # storage is known, see grad_ptrs
    steps: list[torch.Tensor]      # float32 0-dim per parameter: updates applied so far
    state: dict[str, list[torch.Tensor]]  # per state name (exp_avg, ...), aligned with params
    signature: tuple               # signature(hyper) for this step, computed once by the optimizer
    grad_ptrs: torch.Tensor | None = None  # with grads=None: the gradients' new addresses (int64, CPU)


def check_grads(index: int, group: dict, grads: list[torch.Tensor | None]) -> None:
    """Every gradient of group ``index`` dense and shaped, typed and placed like its parameter, or None;
    raises naming the first that is not. The optimizer runs this before any backend sees the step."""
    names = group.get("param_names")
    for i, (p, g) in enumerate(zip(group["params"], grads)):
        if g is None:
            continue
        where = f"param_groups[{index}]['params'][{i}]" + (f" ({names[i]!r})" if names else "")
        if g.layout != torch.strided:
            raise RuntimeError(f"{where} has a sparse gradient ({g.layout}); uba_fused does not support sparse "
                               f"gradients")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(f"{where} has a gradient of shape {tuple(g.shape)}, {g.dtype} on {g.device}, but the "
                               f"parameter is {tuple(p.shape)}, {p.dtype} on {p.device}; the update reads each "
                               f"gradient as its parameter")


def signature(group: dict) -> tuple:
    """The group's values other than its tensors' contents, cheap to compare step to step: tensors
    (a tensor lr, the counter) stand in by identity, so comparing never reads a device value."""
    return tuple((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v)
                 for k, v in group.items() if k != "params")
