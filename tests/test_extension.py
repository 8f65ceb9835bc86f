"""The compiled extension: it must build wherever nvcc and a CUDA torch are, and its schedule code is schedules.py."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import uba_fused as uf
from uba_fused import _ext

CAN_BUILD = shutil.which("nvcc") is not None and torch.version.cuda is not None \
    and os.environ.get("UBA_FUSED_NO_CUDA") != "1"

SCHEDULES = [uf.UBA(100, phi=0.4, warmup_steps=10, min_lr_ratio=0.1), uf.UBA(77, phi=5.0), uf.Cosine(50, 5, 0.2),
             uf.Linear(30), uf.REX(64, 3, 0.05), uf.Constant(8), uf.Constant()]
STEPS = [0, 1, 2, 5, 9, 10, 11, 25, 29, 30, 31, 49, 50, 63, 64, 76, 77, 99, 100, 101, 1000]


@pytest.mark.skipif(not CAN_BUILD, reason="no nvcc or a CPU build of torch: the extension is optional here")
def test_extension_is_built_where_it_can_be():
    # With nvcc present, setup.py fails on a compile error; this catches an install that skipped the build.
    assert _ext._C is not None, f"nvcc and a CUDA torch are present but uba_fused._C did not load: {_ext.ERROR}"


@pytest.mark.skipif(_ext._C is None, reason="uba_fused._C not built")
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_cxx_schedule_function_matches_python(schedule):
    # The float32 C++ function every kernel calls, compiled for the host.
    for t in STEPS:
        got = _ext._C.schedule_factor_host(t, *schedule.kernel_constants())
        assert got == pytest.approx(schedule.factor(t), rel=2e-6, abs=1e-7), t


@pytest.mark.gpu
@pytest.mark.skipif(_ext._C is None or not torch.cuda.is_available(), reason="needs uba_fused._C and a GPU")
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_device_schedule_kernel_matches_python(schedule):
    steps = torch.tensor(STEPS, dtype=torch.int64, device="cuda")
    got = _ext._C.schedule_factor(steps, *schedule.kernel_constants())
    torch.testing.assert_close(got.double().cpu(), schedule.factor_tensor(steps.cpu()), rtol=2e-6, atol=1e-7)


def test_env_report_runs_and_names_every_backend():
    out = subprocess.run([sys.executable, "-m", "uba_fused.env"], capture_output=True, text=True, check=True).stdout
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in out
    assert "auto ->" in out
