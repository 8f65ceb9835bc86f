"""backend="cuda": the kernels of csrc/fused_step.cuh, over the same device tables as backend "triton".

One launch per step (per storage: parameter dtype and state dtype) through ``uba_fused._C.fused_step``; the math is
csrc/updates.cuh (checked on the host against the float64 oracle in CI), the lr is
csrc/schedules.cuh, the counters advance in the kernel exactly as in triton.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from .._ext import _C
from ..registry import CHUNK, RULES, abi
from .plan import STORAGE_ID, Part, Plan
from .cache import StepCache
from .work import Amp, GradSource, GroupWork, Step

if _C is None or not hasattr(_C, "fused_step"):
    raise NotImplementedError("uba_fused._C was built without the fused-step kernels; reinstall with "
                              "`pip install --no-build-isolation -e .` where nvcc is present")
if json.loads(_C.REGISTRY) != abi():
    raise NotImplementedError("uba_fused._C was built from another uba_fused/registry.py than the one imported (a "
                              "stale build: rule, column or schedule numbers differ); rebuild it with "
                              "`pip install --no-build-isolation -e .`")


def prepare(rule: str, work: Sequence[GroupWork], cache: StepCache, grads: GradSource) -> Step:
    plan, table = Plan.for_step(cache.plans, "cuda", rule, work, CHUNK, grads)
    rule_id, n_groups = RULES[rule].id, len(work)

    def update(norm: torch.Tensor | None, amp: Amp | None, sums: torch.Tensor | None) -> None:
        grad_scale, found_inf = plan.amp_args(amp)

        def launch(part: Part, advance: bool) -> None:
            rows = part.rows  # a rule that projects: its rows' meta and coefficients
            _C.fused_step(part.work, part.tensors, table, plan.groups, plan.gaddr, part.done,
                          plan.scratch if norm is None else norm,
                          plan.sums_of(part, sums) if rows is None else rows.meta, grad_scale, found_inf,
                          n_groups, advance, rule_id,
                          STORAGE_ID[part.dtype, part.state_dtype, part.codec, part.state_rounding],
                          None if rows is None else rows.coefs)

        if RULES[rule].projects:
            plan.project(sums)
        plan.launch(launch)

    def sumsq(part: Part, out: torch.Tensor, param: bool = False) -> None:
        _C.grad_sumsq(part.work, part.tensors, table, plan.groups, plan.gaddr, part.done, out, n_groups,
                      rule_id, STORAGE_ID[part.dtype, part.state_dtype, part.codec, part.state_rounding], param)

    def reduce(norm: torch.Tensor | None, amp: Amp | None) -> torch.Tensor:
        def direction(part: Part) -> None:  # the update's direction, computed and not stored
            grad_scale, found_inf = plan.amp_args(amp)
            rows = part.rows  # a rule that projects walks its rows
            _C.direction_sumsq(part.work if rows is None else rows.work, part.tensors, table, plan.groups, plan.gaddr,
                               part.done, plan.scratch if norm is None else norm, grad_scale, found_inf,
                               part.squares if rows is None else rows.squares, n_groups, rule_id,
                               STORAGE_ID[part.dtype, part.state_dtype, part.codec, part.state_rounding],
                               None if rows is None else rows.meta, None if rows is None else rows.coefs)

        return plan.reduce(sumsq, direction, work)

    return Step(update, lambda per_row=False: plan.grad_sumsq(lambda part: sumsq(part, part.partials), per_row),
                reduce, lambda: plan.slots(work))
