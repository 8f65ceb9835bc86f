import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uba_fused as uf

import oracle

BUDGET = [uf.UBA, uf.Cosine, uf.Linear, uf.REX]


def _make(name, total, warmup, r, phi):
    if name == "UBA":
        return uf.UBA(total, phi=phi, warmup_steps=warmup, min_lr_ratio=r)
    if name == "Constant":
        return uf.Constant(warmup_steps=warmup)
    return getattr(uf, name)(total, warmup_steps=warmup, min_lr_ratio=r)


@pytest.mark.parametrize("name", ["UBA", "Cosine", "Linear", "REX", "Constant"])
@pytest.mark.parametrize("total,warmup,r,phi", [(100, 0, 0.0, 1.0), (97, 13, 0.1, 0.3), (10, 9, 0.5, 5.0),
                                                (1, 0, 0.0, 2.0)])
def test_factor_matches_float64_rederivation(name, total, warmup, r, phi):
    s = _make(name, total, warmup, r, phi)
    steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total, total + 1, 3 * total} - {-1})
    steps += list(range(0, 2 * total, max(1, total // 37)))
    for t in steps:
        expected = oracle.schedule_factor(name, t, total, warmup, r if name != "Constant" else 0.0, phi)
        assert s.factor(t) == pytest.approx(expected, rel=1e-14, abs=1e-15), t
    # factor_tensor (what the torch backend evaluates on the device) agrees with factor.
    ts = torch.tensor(steps, dtype=torch.int64)
    torch.testing.assert_close(s.factor_tensor(ts), torch.tensor([s.factor(t) for t in steps], dtype=torch.float64),
                               rtol=0, atol=0)


def test_endpoints_and_past_budget():
    s = uf.UBA(50, phi=0.7, warmup_steps=5, min_lr_ratio=0.25)
    assert s.factor(0) == pytest.approx(1 / 5)
    assert s.factor(4) == 1.0  # last warmup step reaches the peak
    assert s.factor(5) == 1.0  # first decay step: p = 0
    assert s.factor(50) == pytest.approx(0.25, abs=1e-15)
    assert s.factor(10_000) == pytest.approx(0.25, abs=1e-15)


@given(phi=st.floats(0.01, 100.0), t=st.integers(0, 1000))
@settings(max_examples=200, deadline=None)
def test_uba_phi_2_is_cosine_and_bounded(phi, t):
    assert uf.UBA(1000, phi=2.0).factor(t) == pytest.approx(uf.Cosine(1000).factor(t), rel=1e-14, abs=1e-15)
    f = uf.UBA(1000, phi=phi, min_lr_ratio=0.1).factor(t)
    assert 0.1 - 1e-15 <= f <= 1.0 + 1e-15


@given(cls=st.sampled_from(BUDGET), phi=st.floats(0.01, 50.0), total=st.integers(2, 500),
       warmup_frac=st.floats(0.0, 0.9), r=st.floats(0.0, 1.0))
@settings(max_examples=100, deadline=None)
def test_monotone_after_warmup(cls, phi, total, warmup_frac, r):
    warmup = int(warmup_frac * (total - 1))
    s = cls(total, phi=phi, warmup_steps=warmup, min_lr_ratio=r) if cls is uf.UBA else \
        cls(total, warmup_steps=warmup, min_lr_ratio=r)
    f = s.factor_tensor(torch.arange(warmup, total + 3))
    assert bool((f[1:] <= f[:-1] + 1e-15).all())
    w = s.factor_tensor(torch.arange(0, warmup + 1))
    assert bool((w[1:] >= w[:-1]).all())


def test_uba_phi_2_equals_torch_cosine_annealing():
    base, total, r = 0.3, 40, 0.1
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=base)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=r * base)
    ours = uf.UBA(total, phi=2.0, min_lr_ratio=r)
    for t in range(total + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(base * ours.factor(t), rel=1e-12), t
        opt.step()
        torch_sched.step()


@pytest.mark.parametrize("name", ["UBA", "Cosine", "Linear", "REX", "Constant"])
def test_lr_scheduler_adapter_drives_any_torch_optimizer(name):
    s = _make(name, 20, 3, 0.1, 0.6)
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, generator=gen))
    opt = torch.optim.Adam([p], lr=0.01)
    sched = uf.LRScheduler(opt, s)
    for t in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * s.factor(t), rel=1e-14), t
        p.grad = torch.randn(4, generator=gen)
        opt.step()
        sched.step()


def test_round_trip_through_dict():
    for s in [uf.UBA(10, phi=0.5, warmup_steps=2, min_lr_ratio=0.1), uf.Cosine(7, warmup_steps=1), uf.Linear(3),
              uf.REX(9, min_lr_ratio=0.3), uf.Constant(warmup_steps=5)]:
        assert uf.schedules.schedule_from_dict(s.to_dict()) == s
        assert eval(repr(s), {**vars(uf)}) == s


@pytest.mark.parametrize("make,match", [
    (lambda: uf.UBA(10, phi=0.0), "phi must be finite and > 0"),
    (lambda: uf.UBA(10, phi=-1.0), "phi"),
    (lambda: uf.UBA(10, phi=math.nan), "phi"),
    (lambda: uf.UBA(10, phi=math.inf), "phi"),
    (lambda: uf.Cosine(0), "total_steps must be >= 1"),
    (lambda: uf.Linear(-5), "total_steps"),
    (lambda: uf.REX(10, warmup_steps=10), "warmup_steps must be < total_steps"),
    (lambda: uf.UBA(10, warmup_steps=-1), "warmup_steps must be >= 0"),
    (lambda: uf.Cosine(10, min_lr_ratio=1.5), "min_lr_ratio must be in"),
    (lambda: uf.Cosine(10, min_lr_ratio=math.nan), "min_lr_ratio"),
    (lambda: uf.Constant(warmup_steps=-2), "warmup_steps"),
    (lambda: uf.UBA(10).factor(-1), "step must be >= 0"),
])
def test_bad_schedule_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: uf.Cosine(10.5), "total_steps must be an integer"), (lambda: uf.UBA("10"), "total_steps"),
    (lambda: uf.Linear(True), "total_steps"), (lambda: uf.UBA(10, phi="2"), "phi must be a real"),
    # A budget schedule needs its budget: total_steps=None would never decay.
    (lambda: uf.UBA(total_steps=None), "total_steps must be an integer, got NoneType"),
    (lambda: uf.REX(None), "total_steps must be an integer"),
    # Everything after total_steps is keyword-only: UBA(100, 10) once meant phi=10, Cosine(100, 10) warmup=10.
    (lambda: uf.UBA(100, 10), "positional argument"), (lambda: uf.Cosine(100, 10), "positional argument"),
    (lambda: uf.Constant(5), "positional argument"),
])
def test_schedule_argument_types(make, match):
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize("d,match", [
    ({"name": "UBA", "total_steps": 10, "phi": 1.0, "warmup": 3}, r"unknown key\(s\) \['warmup'\]; UBA takes"),
    ({"name": "Cosine", "total_steps": 10, "phi": 1.0}, r"unknown key\(s\) \['phi'\]"),
    ({"name": "Linear", "warmup_steps": 2}, "Linear needs 'total_steps'"),
    ({"name": "Step", "total_steps": 10}, "expected a 'name' among"),
    ({"total_steps": 10}, "expected a 'name' among"),
])
def test_schedule_dicts_that_no_schedule_wrote_are_refused(d, match):
    with pytest.raises(ValueError, match=match):
        uf.schedules.schedule_from_dict(d)


def test_lr_scheduler_adapter_state_dict_loads_with_weights_only():
    # torch.load's default (weights_only=True) refuses arbitrary objects: the schedule is stored as a dict.
    import io

    def make():
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        return opt, uf.LRScheduler(opt, uf.UBA(20, phi=0.5, warmup_steps=2))

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True, torch's default
    assert saved["schedule"] == {"name": "UBA", "total_steps": 20, "phi": 0.5, "warmup_steps": 2, "min_lr_ratio": 0.0}
    opt2, sched2 = make()
    sched2.load_state_dict(saved)
    assert sched2.schedule == sched.schedule and sched2.last_epoch == 7
    for _ in range(3):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        expected = 0.1 * sched.schedule.factor(sched.last_epoch)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-14)


# -- Table: any schedule as a tensor of factors, read by the kernels --------------------------------------------
from harness import capture_step  # noqa: E402
from test_kernels import DEVICE, EVERY_BACKEND  # noqa: E402

KINDS = [uf.UBA(12, phi=0.6, warmup_steps=3, min_lr_ratio=0.1), uf.Cosine(12, warmup_steps=2), uf.Linear(12),
         uf.REX(12, min_lr_ratio=0.2), uf.Constant(warmup_steps=4)]


@pytest.mark.parametrize("schedule", KINDS, ids=repr)
def test_table_of_a_kind_is_that_kind_in_float32_and_clamps_at_its_end(schedule):
    table = uf.Table.of(schedule, 12)
    assert table.total_steps == 12 and table.factors.dtype == torch.float32
    for t in range(20):  # past the end: the last factor
        want = schedule.factor(min(t, 11))
        assert table.factor(t) == float(torch.tensor(want, dtype=torch.float32)), t
        assert float(table.factor_tensor(torch.tensor(t))) == table.factor(t), t
    steps = torch.arange(20)
    torch.testing.assert_close(table.factor_tensor(steps), schedule.factor_tensor(steps.clamp(max=11)).float().double(),
                               rtol=0, atol=0)


def _run(backend, schedules, steps=15, fill=None):
    """SGD with momentum over two groups (one schedule each, in one launch on the kernels) for ``steps`` steps on fresh
    seeded gradients; each step's applied lrs and the final parameters. ``fill``: (step, value) to fill the first
    group's table with before that step."""
    gen = torch.Generator().manual_seed(40)
    ps = [torch.randn(n, generator=gen).to(DEVICE).requires_grad_() for n in (37, 4100)]
    opt = uf.SGD([{"params": [ps[0]], "schedule": schedules[0]}, {"params": [ps[1]], "schedule": schedules[1],
                                                                   "lr": 0.05}],
                 lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend)
    lrs = []
    for t in range(steps):
        if fill is not None and t == fill[0]:
            schedules[0].factors.fill_(fill[1])
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
        lrs.append([float(x) for x in opt.get_last_lr()])
    return lrs, [p.detach().cpu() for p in ps], opt


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_table_groups_step_as_their_kinds_on_every_backend(backend):
    """Each kind against its Table of T + 1 steps (a Table group and a closed-form one in one launch), 3 steps past
    the budget: the applied lr is the kind's to float32 rounding (the kernels evaluate the closed forms in float32,
    the table holds float64 values rounded once), and so are the parameters."""
    for i, kind in enumerate(KINDS[:2] if backend in ("triton", "cuda") else KINDS):
        other = KINDS[(i + 1) % len(KINDS)]
        ref_lrs, ref_ps, _ = _run(backend, [kind, other])
        lrs, ps, opt = _run(backend, [uf.Table.of(kind, 13, DEVICE), other])
        assert opt.param_groups[0]["schedule"].kind == uf.registry.KIND["table"]
        for t, (a, b) in enumerate(zip(lrs, ref_lrs)):
            assert a == pytest.approx(b, rel=1e-6, abs=0), (kind, t)  # (a neighbouring step: 1e-2 and more)
            assert a[0] == pytest.approx(0.1 * kind.factor(t), rel=1e-6), (kind, t)
        for p, q in zip(ps, ref_ps):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_a_table_filled_in_place_changes_the_steps_to_come(backend):
    """The kernels read the table on the device at every step: filled with 0 from step 5 on, the first group stops
    (its lr 0; its momentum still moves, the parameter does not), the second goes on."""
    table = uf.Table.of(uf.Linear(12), 12, DEVICE)
    lrs, ps, _ = _run(backend, [table, uf.Cosine(12)], steps=9, fill=(5, 0.0))
    assert [lr[0] for lr in lrs[5:]] == [0.0] * 4 and all(lr[0] > 0 for lr in lrs[:5])
    assert all(lr[1] > 0 for lr in lrs)
    _, before, _ = _run(backend, [uf.Table.of(uf.Linear(12), 12, DEVICE), uf.Cosine(12)], steps=5)
    torch.testing.assert_close(ps[0], before[0], rtol=0, atol=0)


def test_table_state_dict_round_trip_continues_as_if_uninterrupted(tmp_path):
    """Saved as {"name": "Table", "factors": tensor}: torch.load(weights_only=True) reads it, and a fresh optimizer
    (another schedule) that loads it after 4 steps continues bit for bit as the uninterrupted 8 steps."""
    schedule = uf.Table.of(uf.UBA(10, phi=0.5, warmup_steps=2), 10)
    whole_lrs, whole, _ = _run("torch", [schedule, uf.Linear(10)], steps=8)
    first_lrs, _, opt = _run("torch", [uf.Table(schedule.factors.clone()), uf.Linear(10)], steps=4)
    torch.save(opt.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert sd["param_groups"][0]["schedule"]["name"] == "Table"
    assert torch.equal(sd["param_groups"][0]["schedule"]["factors"], schedule.factors)
    ps = [q["params"][0].detach().clone().requires_grad_() for q in opt.param_groups]
    fresh = uf.SGD([{"params": [ps[0]], "schedule": uf.Constant()}, {"params": [ps[1]], "lr": 0.05}], lr=0.1,
                   momentum=0.9, weight_decay=0.01, backend="torch")
    fresh.load_state_dict(sd)
    assert isinstance(fresh.param_groups[0]["schedule"], uf.Table)
    gen = torch.Generator().manual_seed(40)  # _run's draws: the parameters, then each step's gradients
    draws = [[torch.randn(n, generator=gen).to(DEVICE) for n in (37, 4100)] for _ in range(9)]
    lrs = []
    for grads in draws[5:]:  # steps 4-7
        for p, g in zip(ps, grads):
            p.grad = g
        fresh.step()
        lrs.append([float(x) for x in fresh.get_last_lr()])
    assert first_lrs + lrs == whole_lrs
    for p, q in zip(ps, whole):
        assert torch.equal(p.detach().cpu(), q)


@pytest.mark.parametrize("make,error,match", [
    (lambda: uf.Table([]), ValueError, "non-empty 1-D floating-point"),
    (lambda: uf.Table(torch.ones(3, 2)), ValueError, r"shape \(3, 2\)"),
    (lambda: uf.Table(torch.arange(4)), ValueError, "floating-point tensor"),
    (lambda: uf.Table([1.0, -0.5, 1.0]), ValueError, r"factors\[1\] = -0.5"),
    (lambda: uf.Table([1.0, math.nan]), ValueError, r"finite and >= 0, got factors\[1\] = nan"),
    (lambda: uf.Table([1.0, math.inf]), ValueError, r"factors\[1\] = inf"),
    (lambda: uf.Table([1.0, 0.5], total_steps=3), ValueError, "factors holds 2 steps, total_steps is 3"),
    (lambda: uf.Table("abc"), TypeError, "a 1-D tensor or a sequence of numbers"),
    (lambda: uf.Table.of(uf.Linear(5), 0), ValueError, "total_steps must be >= 1"),
    (lambda: uf.Table.of("linear", 5), TypeError, "must be a uba_fused schedule"),
])
def test_bad_tables_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_table_on_another_device_than_the_parameters_is_refused_before_any_change():
    p = torch.nn.Parameter(torch.ones(5))
    opt = uf.SGD([p], lr=0.1, schedule=uf.Table([1.0, 0.5]), backend="torch")
    p.grad = torch.ones(5)
    opt.step()
    away = uf.Table([1.0, 0.5])
    away.factors = torch.ones(2, device="meta")  # (no second device here: a table placed where the kernels are not)
    with pytest.raises(ValueError, match=r"a Table must be on the parameters' device \(cpu\), .* got meta"):
        uf.SGD([p], schedule=away)
    opt.param_groups[0]["schedule"] = away
    before = p.detach().clone()
    with pytest.raises(ValueError, match="a Table must be on the parameters' device"):
        opt.step()
    assert torch.equal(p.detach(), before) and int(opt.param_groups[0]["schedule_step"]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_a_captured_step_reads_its_table_at_every_replay_and_never_syncs(backend):
    """A graph replays the step with the schedule counter and the table read on the device: the applied lrs are the
    table's at each replay, filling the table between replays changes the next ones, and nothing syncs."""
    table = uf.Table.of(uf.UBA(8, warmup_steps=2), 9, "cuda")
    gen = torch.Generator().manual_seed(42)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen).cuda())
    p.grad = torch.randn(5000, generator=gen).cuda()
    opt = uf.SGD([p], lr=0.5, momentum=0.9, schedule=table, backend=backend)
    opt.step()
    graph = capture_step(opt)
    lrs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(1, 11):
            if t == 6:
                table.factors[6:].fill_(0.25)
            graph.replay()
            lrs.append(opt.get_last_lr()[0].clone())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = [0.5 * uf.UBA(8, warmup_steps=2).factor(t) for t in range(1, 6)] + [0.5 * 0.25] * 5
    assert [float(x) for x in lrs] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_a_table_put_in_a_groups_place_is_the_one_read(backend):
    """group["schedule"] = another Table between steps: the next step reads the new one (the kernels take its address
    anew with the group's row), and the old one may be freed."""
    gen = torch.Generator().manual_seed(41)
    p = torch.randn(300, generator=gen).to(DEVICE).requires_grad_()
    opt = uf.SGD([p], lr=1.0, schedule=uf.Table(torch.full((10,), 0.5, device=DEVICE)), backend=backend)
    lrs = []
    for t in range(6):
        if t == 3:
            opt.param_groups[0]["schedule"] = uf.Table(torch.arange(10, dtype=torch.float32, device=DEVICE) / 16)
        p.grad = torch.randn(300, generator=gen).to(DEVICE)
        opt.step()
        lrs.append(float(opt.get_last_lr()[0]))
    assert lrs == [0.5, 0.5, 0.5, 3 / 16, 4 / 16, 5 / 16]
