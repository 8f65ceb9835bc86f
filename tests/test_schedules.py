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
