"""backend="cuda": the kernels of csrc/fused_step.cu, over the same device tables as backend "triton".

One launch per step (per parameter dtype) through ``uba_fused._C.fused_step``; the math is
csrc/updates.cuh (checked on the host against the float64 oracle in CI), the lr is
csrc/schedules.cuh, the counters advance in the kernel exactly as in triton.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import json

from .._ext import _C
from ..registry import CHUNK, DTYPES, RULES, abi
from .plan import Part, Plan
from .work import GradSource, GroupWork, StepCache

if _C is None or not hasattr(_C, "fused_step"):
    raise NotImplementedError("uba_fused._C was built without the fused-step kernels; reinstall with "
                              "`pip install --no-build-isolation -e .` where nvcc is present")
if json.loads(_C.REGISTRY) != abi():
    raise NotImplementedError("uba_fused._C was built from another uba_fused/registry.py than the one imported (a "
                              "stale build: rule, column or schedule numbers differ); rebuild it with "
                              "`pip install --no-build-isolation -e .`")

_DTYPE_ID = {getattr(torch, name): i for i, name in enumerate(DTYPES)}


def prepare(rule: str, work: Sequence[GroupWork], cache: StepCache, grads: GradSource) -> Callable[[], None]:
    plan, table = Plan.for_step(cache, "cuda", rule, work, CHUNK, grads)
    rule_id, n_groups = RULES[rule].id, len(work)

    def launch(part: Part, advance: bool) -> None:
        _C.fused_step(part.work, part.tensors, table, plan.groups, plan.gaddr, part.done, n_groups, advance, rule_id,
                      _DTYPE_ID[part.dtype])

    return lambda: plan.launch(launch)
