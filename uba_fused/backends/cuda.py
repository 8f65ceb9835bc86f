"""backend="cuda": the kernels of csrc/fused_step.cu, over the same device tables as backend "triton".

One launch per step (per parameter dtype) through ``uba_fused._C.fused_step``; the math is
csrc/updates.cuh (checked on the host against the float64 oracle in CI), the lr is
csrc/schedules.cuh, the counters advance in the kernel exactly as in triton.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._ext import _C
from .plan import GROUP_COLS, NO_GRAD, TENSOR_COLS, Plan
from .work import RULE_ID, GradSource, GroupWork

if _C is None or not hasattr(_C, "fused_step"):
    raise NotImplementedError("uba_fused._C was built without the fused-step kernels; reinstall with "
                              "`pip install --no-build-isolation -e .` where nvcc is present")
assert (_C.GROUP_COLS, _C.TENSOR_COLS, _C.NO_GRAD) == (len(GROUP_COLS), TENSOR_COLS, NO_GRAD), \
    "csrc/tables.h disagrees with plan.py"

_DTYPE_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def prepare(rule: str, work: Sequence[GroupWork], cache: dict, grads: GradSource) -> Callable[[], None]:
    plan, table = Plan.for_step(cache, "cuda", rule, work, _C.CHUNK, grads)
    return lambda: _launch(plan, table, rule, len(work))


def _launch(plan: Plan, grads: torch.Tensor, rule: str, n_groups: int) -> None:
    last = len(plan.parts) - 1
    for i, part in enumerate(plan.parts):
        _C.fused_step(part.work, part.tensors, grads, plan.groups, plan.gaddr, part.done, n_groups, i == last,
                      RULE_ID[rule], _DTYPE_ID[part.dtype])
