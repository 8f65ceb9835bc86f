"""The CUDA backend's math (csrc/updates.cuh, schedules.cuh), compiled for the host, against the oracle.

The kernel calls these same functions on the device; the GPU tests in test_kernels.py check the
launcher around them. Here CI checks every update rule and the in-kernel lr without a GPU.
"""

import numpy as np
import pytest
import torch

from uba_fused import _ext
from uba_fused.backends import GroupWork, plan
from uba_fused.backends.work import RULE_ID, signature

import oracle
from harness import CASE_IDS, CASES, SCHEDULES, assert_scaled_close, f64

pytestmark = pytest.mark.skipif(_ext._C is None or not hasattr(_ext._C, "update_host"),
                                reason=f"uba_fused._C not built: {_ext.ERROR}")


def _row(case, schedule=None, lr=None):
    opt = case.make([torch.zeros(1, requires_grad=True)], schedule=schedule, backend="torch")
    group = opt.param_groups[0]
    if lr is not None:
        group["lr"] = lr
    names = opt._state_names(group)
    w = GroupWork(0, group, schedule, group["schedule_step"], opt._last_lr[0], [], [], [], {n: [] for n in names},
                  signature(group))
    return torch.tensor(plan.group_row(w), dtype=torch.float64), group, names


def test_table_layouts_agree_with_plan():
    assert _ext._C.GROUP_COLS == len(plan.GROUP_COLS)
    assert _ext._C.TENSOR_COLS == plan.TENSOR_COLS


@pytest.mark.parametrize("k", [1, 2, 9])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_rules_match_oracle(case, k):
    gen = torch.Generator().manual_seed(k)
    n = 4099
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 10 ** (-3 * torch.rand(n, generator=gen))
    a, b = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    row, group, names = _row(case)
    lr = 0.7 * group["lr"]  # the kernel multiplies the group's lr by the schedule factor
    state = {"exp_avg": f64(a), "exp_avg_sq": f64(b), "exp_avg_var": f64(b), "momentum_buffer": f64(a)}
    hyper = {key: v for key, v in group.items() if key not in ("params", "schedule", "backend", "schedule_step", "lr")}
    exp_p, exp_s = oracle.RULES[case.rule](f64(p), f64(g), state, k, lr=lr, **hyper)
    ignore = oracle.lion_ambiguous(f64(g), state, **hyper) if case.rule == "lion" else None
    _ext._C.update_host(RULE_ID[case.rule], p, g, a, b, row, lr, float(k))
    assert_scaled_close(p, exp_p, 2e-6, f"{case.id} param", ignore)
    if names:
        assert_scaled_close(a, exp_s[names[0]], 2e-6, f"{case.id} {names[0]}")
    if len(names) == 2:
        assert_scaled_close(b, exp_s[names[1]], 2e-6, f"{case.id} {names[1]}")


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_in_kernel_lr_matches_schedule(schedule):
    row, group, _ = _row(CASES[0], schedule=schedule, lr=0.25)
    for t in [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 50]:
        expected = 0.25 * (1.0 if schedule is None else schedule.factor(t))
        assert _ext._C.group_lr_host(row, t) == pytest.approx(expected, rel=2e-6, abs=1e-9), t


def test_update_host_refuses_bad_tensors():
    row, _, _ = _row(CASES[0])
    x = torch.zeros(3)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        _ext._C.update_host(0, x, x, x, torch.zeros(2), row, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="unknown rule"):
        _ext._C.update_host(7, x, x.clone(), x.clone(), x.clone(), row, 0.1, 1.0)
    assert np.all(f64(x) == 0)
