"""The compiled extension: it must build wherever nvcc and a CUDA torch are, and its schedule code is schedules.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import uba_fused as uf
from uba_fused import _ext, registry

CAN_BUILD = shutil.which("nvcc") is not None and torch.version.cuda is not None \
    and os.environ.get("UBA_FUSED_NO_CUDA") != "1"

SCHEDULES = [uf.UBA(100, phi=0.4, warmup_steps=10, min_lr_ratio=0.1), uf.UBA(77, phi=5.0),
             uf.Cosine(50, warmup_steps=5, min_lr_ratio=0.2), uf.Linear(30),
             uf.REX(64, warmup_steps=3, min_lr_ratio=0.05), uf.Constant(warmup_steps=8), uf.Constant()]
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


def test_committed_registry_header_is_generated_from_registry_py():
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "registry.h")
    with open(path) as f:
        committed = f.read()
    assert committed == registry.cpp_header(), (
        "csrc/registry.h is not what uba_fused/registry.py generates: run `python uba_fused/registry.py "
        "csrc/registry.h` (setup.py does it before every build) and commit it")


@pytest.mark.skipif(_ext._C is None, reason="uba_fused._C not built")
def test_extension_was_built_from_this_registry():
    built = json.loads(_ext._C.REGISTRY)
    now = registry.abi()
    for rule, spec in now["rules"].items():  # by name first: the sentence says what differs
        assert built["rules"].get(rule) == spec, f"rule {rule!r}: the build has {built['rules'].get(rule)}"
    for key in ("tensor_cols", "group_cols", "dtypes", "schedule_kinds", "chunk", "no_grad"):
        assert built[key] == now[key], f"{key}: the build has {built[key]}, registry.py {now[key]}"
    assert built == now


def test_schedule_kinds_and_rules_are_numbered_by_the_registry():
    assert [type(s).kind for s in SCHEDULES[:6]] == [registry.KIND[n] for n in
                                                      ("uba", "uba", "cosine", "linear", "rex", "constant")]
    for cls in (uf.AdamW, uf.AdaBelief, uf.Adan, uf.Lion, uf.SGD, uf.Adagrad):
        assert cls.rule in registry.RULES, cls
    assert [r.id for r in registry.RULES.values()] == list(range(len(registry.RULES)))


@pytest.mark.skipif(_ext._C is None, reason="uba_fused._C not built")
def test_fused_step_refuses_bad_tables_before_touching_anything():
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    step, counter, lr_out = torch.zeros(()), torch.zeros((), dtype=torch.int64), torch.zeros(())
    before = p.clone()
    # One tensor (gradient slot 0), the sentinel (slot 1: no gradient); SGD without momentum keeps no state.
    cols = registry.TENSOR_COLS + ("state0",)
    row = dict(param=p.data_ptr(), grad_slot=0, step=step.data_ptr(), numel=10, group=0, info=1 << 1, master=0,
               absmax=0, scalar=0, state0=0)
    sentinel = {**row, "param": 0, "grad_slot": 1, "numel": 0}
    tensors = torch.tensor([[row[c] for c in cols], [sentinel[c] for c in cols]])
    gcols = registry.group_cols("sgd")
    good = {"work": torch.tensor([[0, 0], [1, 0]]), "tensors": tensors, "grads": torch.tensor([g.data_ptr(), -1]),
            "groups": torch.zeros(1, len(gcols), dtype=torch.float64),
            "gaddr": torch.tensor([[counter.data_ptr(), lr_out.data_ptr(), 0]]),  # (registry.GROUP_ADDRESSES)
            "done": torch.zeros(3, dtype=torch.int32)}

    def run(**kw):
        args = {**good, "norm": torch.zeros((), dtype=torch.float64), "reduced": torch.zeros((), dtype=torch.float64),
                "grad_scale": torch.ones(1),
                "found_inf": torch.zeros(1), "n_groups": 1, "advance": True,
                "rule": registry.RULES["sgd"].id, "storage": 0, **kw}
        _ext._C.fused_step(**args)

    n = len(gcols)
    bad = [({"groups": good["groups"].float()}, "groups must be Double"),
           ({"done": torch.zeros(4, dtype=torch.int32)}, r"done must hold rows \+ 1 = 3 counters, got 4"),
           ({"work": torch.zeros(2, 3, dtype=torch.int64)}, r"work must have shape \[items, 2\], got \[2, 3\]"),
           ({"tensors": tensors[:, :9].contiguous()},
            r"tensors must have shape \[rows >= 1, 10\] for rule 3, got \[2, 9\]"),
           ({"groups": torch.zeros(1, n - 1, dtype=torch.float64)}, rf"groups must have shape \[n_groups = 1, {n}\]"),
           ({"groups": torch.zeros(2, n, dtype=torch.float64)}, r"groups must have shape \[n_groups = 1"),
           ({"gaddr": torch.zeros(1, dtype=torch.int64)}, "gaddr must hold 3 \\* n_groups = 3 addresses, got 1"),
           ({"tensors": tensors.t().contiguous().t()}, "tensors must be contiguous"),
           ({"grads": torch.zeros(0, dtype=torch.int64)}, r"grads must be a vector of >= 1 addresses, got \[0\]"),
           ({"grads": good["grads"].int()}, "grads must be Long"),
           ({"rule": len(registry.RULES)}, f"unknown rule {len(registry.RULES)}"),
           ({"storage": len(registry.STORAGES)}, f"unknown storage code {len(registry.STORAGES)}"),
           ({"norm": torch.zeros(())}, "norm must be a contiguous Double tensor of >= 1 elements, got Float"),
           ({"grad_scale": torch.ones(1, dtype=torch.float64)}, "grad_scale must be a contiguous Float tensor"),
           ({"found_inf": torch.zeros(0)}, "found_inf must be a contiguous Float tensor of >= 1 elements"),
           # LARS reads 2 sums per tensor row (Rule.reduces): 2 rows need 4
           ({"rule": registry.RULES["lars"].id, "groups": torch.zeros(1, len(registry.group_cols("lars")),
                                                                         dtype=torch.float64),
             "reduced": torch.zeros(3, dtype=torch.float64)},
            "reduced must be a contiguous Double tensor of >= 4 elements, got Double")]
    # A table on another device than work's must be refused before any address is read (on a GPU, a CUDA
    # table beside CPU ones crashed the interpreter once). The meta device shows it without a GPU.
    others = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in ("tensors", "grads", "groups", "gaddr", "done"):
        for dev in others:
            bad.append(({name: good[name].to(dev)}, f"{name} is on {dev}(:0)?, expected cpu"))
    bad.append(({"work": good["work"].to("meta")}, "the tables must be CUDA or CPU tensors, got meta"))
    if torch.cuda.is_available():
        bad.append(({"work": good["work"].cuda()}, "tensors is on cpu, expected cuda:0"))
    for kw, message in bad:
        with pytest.raises(RuntimeError, match=message):
            run(**kw)
    assert torch.equal(p, before) and int(counter) == 0 and float(step) == 0.0
    # The good tables run (on the host, for CPU tables): plain SGD with the group's lr 0.5, no schedule.
    good["groups"][0, gcols.index("lr")] = 0.5
    good["groups"][0, gcols.index("total")] = 1.0
    good["groups"][0, gcols.index("phi")] = 2.0
    run()
    torch.testing.assert_close(p, before - 0.5 * g, rtol=0, atol=0)
    assert int(counter) == 1 and float(step) == 1.0 and float(lr_out) == 0.5

    # The pre-pass over the same tables: one sum of squares per work item (the sentinel's is 0).
    out = torch.full((2,), -1.0, dtype=torch.float64)
    sumsq = dict(good, n_groups=1, rule=registry.RULES["sgd"].id, storage=0)
    with pytest.raises(RuntimeError, match="out must be a contiguous Double tensor of >= 2 elements"):
        _ext._C.grad_sumsq(**sumsq, out=out[:1])
    with pytest.raises(RuntimeError, match="out must be a contiguous Double tensor of >= 2 elements, got Float"):
        _ext._C.grad_sumsq(**sumsq, out=out.float())
    _ext._C.grad_sumsq(**sumsq, out=out)  # summed in float64: a float32 sum of these squares would differ
    assert out[0].item() == pytest.approx(float((g.double() ** 2).sum()), rel=1e-12) and out[1].item() == 0.0

    # A group that clips scales the gradient by min(1, max_grad_norm / (norm + eps)) before its update.
    good["groups"][0, gcols.index("max_grad_norm")] = 0.25
    good["groups"][0, gcols.index("clip_eps")] = 0.5
    before = p.clone()
    run(norm=torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(p, before - 0.5 * (0.1 * g), rtol=1e-6, atol=0)

    # GradScaler's gradients carry its scale (8): divided out, and the clipping factor taken from the norm of the
    # unscaled gradients, 16 / 8 = 2 (as scaler.unscale_ then clip_grad_norm_ computes it).
    before = p.clone()
    run(norm=torch.tensor(16.0, dtype=torch.float64), grad_scale=torch.tensor([8.0]), found_inf=torch.zeros(1))
    torch.testing.assert_close(p, before - 0.5 * (0.1 * g / 8), rtol=1e-6, atol=0)
    assert int(counter) == 3 and float(step) == 3.0
    # found_inf set: no parameter or step count changes; the group's counter advances (the schedule follows steps).
    before = p.clone()
    run(grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    assert torch.equal(p, before) and float(step) == 3.0 and int(counter) == 4


def test_env_report_runs_and_names_every_backend():
    out = subprocess.run([sys.executable, "-m", "uba_fused.env"], capture_output=True, text=True, check=True).stdout
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in out
    assert "auto ->" in out
