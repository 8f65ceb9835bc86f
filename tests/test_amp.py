"""torch.amp.GradScaler's protocol: ``scaler.step(opt)`` hands the scale and found_inf to the step (as to torch's fused
optimizers), the kernels divide the scale out as they load each gradient, and a step with an inf or NaN gradient
changes no parameter, state or step count. The group's schedule counter advances on such a step (the schedule
follows the loop's iterations, as a torch LR scheduler stepped every iteration does).

Compared step by step with torch's fused AdamW and SGD under the same scaler, and every rule with its own run fed
the unscaled gradients: GradScaler's scales are powers of two, so dividing one out is exact and the runs agree
bit for bit.
"""

import pytest
import torch

import uba_fused as uf

from harness import CASES, f64, assert_scaled_close, make_params, random_grads
from test_kernels import DEVICE, EVERY_BACKEND

# Scales change during the run: growth every 2 finite steps, backoff at each inf step.
SCALER = dict(init_scale=2.0**10, growth_interval=2)
INF_STEPS = {2: float("inf"), 5: float("nan")}
STEPS = 7
TWINS = {  # (ours, torch's fused twin, shared hyper-parameters)
    "adamw": (uf.AdamW, torch.optim.AdamW, dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)),
    "sgd": (uf.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1)),
}


def _scaled(scaler, params, grads, t):
    """The gradients as backward of a scaled loss leaves them (laid out as their parameters: torch's fused CPU kernels
    walk a gradient as if it were); at INF_STEPS one element is not finite."""
    out = [None if g is None else scaler.scale(torch.empty_like(p).copy_(g)) for p, g in zip(params, grads)]
    if t in INF_STEPS:
        out[3].view(-1)[5] = INF_STEPS[t]
    return out


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {id(p): {k: v.clone() for k, v in opt.state[p].items()}
                                                   for p in params if p in opt.state}


def _assert_unchanged(opt, params, snap, where):
    ps, states = snap
    for i, (p, p0) in enumerate(zip(params, ps)):
        assert torch.equal(p, p0), f"{where}: param {i} changed on a step GradScaler skipped"
        for k, v in states.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v), f"{where}: state {k!r} of param {i} changed on a skipped step"


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("rule", TWINS)
def test_gradscaler_steps_match_torch_fused(rule, backend):
    ours_cls, torch_cls, kw = TWINS[rule]
    a, b = make_params(DEVICE, seed=3), make_params(DEVICE, seed=3)
    ours = ours_cls(a, **kw, backend=backend)
    theirs = torch_cls(b, **kw, fused=True)
    sa, sb = torch.amp.GradScaler(DEVICE, **SCALER), torch.amp.GradScaler(DEVICE, **SCALER)
    gen = torch.Generator().manual_seed(4)
    for t in range(STEPS):
        grads = random_grads(a, gen, skip=1 if t == 3 else None)
        for params, opt, scaler in ((a, ours, sa), (b, theirs, sb)):
            for p, g in zip(params, _scaled(scaler, params, grads, t)):
                p.grad = g
        snap = _snapshot(ours, a)
        sa.step(ours)
        sb.step(theirs)
        assert float(sa.get_scale()) == float(sb.get_scale())
        sa.update()
        sb.update()
        where = f"{rule}/{backend} step {t}"
        assert int(ours.param_groups[0]["schedule_step"]) == t + 1, f"{where}: the schedule counter advances"
        if t in INF_STEPS:
            _assert_unchanged(ours, a, snap, where)
        for i, (p, q) in enumerate(zip(a, b)):
            assert_scaled_close(p, f64(q), 2e-6, f"{where}: param {i}")
            for k, v in theirs.state.get(q, {}).items():
                if k == "step":
                    assert float(ours.state[p]["step"]) == float(v), f"{where}: step count of param {i}"
                else:
                    assert_scaled_close(ours.state[p][k], f64(v), 2e-6, f"{where}: state {k} of param {i}")
    assert float(sa.get_scale()) == 2.0**10 * 2 / 2 / 2 * 2  # grew at t=1, backed off at 2 and 5, grew at 4


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_gradscaler_with_clipping_matches_unscale_then_clip_grad_norm(backend):
    """max_grad_norm clips the unscaled gradients, as scaler.unscale_(opt), clip_grad_norm_, scaler.step(opt) does."""
    kw = TWINS["adamw"][2]
    a, b = make_params(DEVICE, seed=5), make_params(DEVICE, seed=5)
    ours = uf.AdamW(a, **kw, max_grad_norm=0.05, backend=backend)
    theirs = torch.optim.AdamW(b, **kw, fused=True)
    sa, sb = torch.amp.GradScaler(DEVICE, **SCALER), torch.amp.GradScaler(DEVICE, **SCALER)
    gen = torch.Generator().manual_seed(6)
    for t in range(5):
        grads = random_grads(a, gen)
        for params, scaler in ((a, sa), (b, sb)):
            for p, g in zip(params, _scaled(scaler, params, grads, t)):
                p.grad = g
        sa.step(ours)
        sb.unscale_(theirs)
        torch.nn.utils.clip_grad_norm_(b, 0.05)
        sb.step(theirs)
        sa.update()
        sb.update()
        for i, (p, q) in enumerate(zip(a, b)):
            assert_scaled_close(p, f64(q), 2e-6, f"{backend} step {t}: param {i}")


@pytest.mark.parametrize("backend", EVERY_BACKEND)
# (AdamP's per-row sums and SGD-SaI's g-SNR are of the unscaled gradients too)
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("adabelief", "lion", "adan-clip", "sgd-plain", "adamp",
                                                               "sgd_sai")],
                         ids=lambda c: c.id)
def test_every_rule_under_gradscaler_equals_its_run_on_unscaled_gradients(case, backend):
    """The scales are powers of two: divided out exactly, so the run under the scaler is the plain run, bit for bit,
    except at the skipped steps, which change nothing (Adan's clipping norm is the scaled one, unscaled in the
    kernel: exact too)."""
    a, b = make_params(DEVICE, seed=7), make_params(DEVICE, seed=7)
    ours, plain = case.make(a, backend=backend), case.make(b, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE, **SCALER)
    gen = torch.Generator().manual_seed(8)
    for t in range(STEPS):
        grads = random_grads(a, gen)
        scaled = _scaled(scaler, a, grads, t)
        for p, g in zip(a, scaled):
            p.grad = g
        snap = _snapshot(ours, a)
        kept = [g.clone() for g in scaled]
        scaler.step(ours)
        # the hand-over, not GradScaler's own unscale_ (which divides the gradients in place and syncs on found_inf)
        assert all(torch.allclose(p.grad, g, rtol=0, atol=0, equal_nan=True) for p, g in zip(a, kept)), \
            "the gradients were unscaled in place"
        scaler.update()
        where = f"{case.id}/{backend} step {t}"
        if t in INF_STEPS:
            _assert_unchanged(ours, a, snap, where)
            continue
        for p, g in zip(b, grads):
            p.grad = g
        plain.step()
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"{where}: param {i} differs from the run on unscaled gradients"
            for k, v in plain.state.get(q, {}).items():
                assert torch.equal(ours.state[p][k], v), f"{where}: state {k!r} of param {i} differs"
    assert int(ours.param_groups[0]["schedule_step"]) == STEPS and int(plain.param_groups[0]["schedule_step"]) == 5


def test_a_non_finite_norm_under_gradscaler_skips_the_step():
    """Under GradScaler a non-finite norm behaves as found_inf: here found_inf is 0 (handed over by hand), yet a
    gradient is inf, so the clipping norm is; nothing changes."""
    params = make_params(DEVICE, seed=9)
    opt = uf.AdamW(params, lr=1e-2, max_grad_norm=1.0, backend="torch")
    for p, g in zip(params, random_grads(params, torch.Generator().manual_seed(10))):
        p.grad = g
    params[0].grad[0] = float("inf")
    snap = _snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=DEVICE), torch.zeros(1, device=DEVICE)
    opt.step()
    _assert_unchanged(opt, params, snap, "inf norm")
    assert all(float(opt.state[p]["step"]) == 0.0 for p in params)


def test_a_malformed_hand_over_raises_naming_it():
    params = make_params(DEVICE, seed=11)
    opt = uf.SGD(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.grad_scale = 2.0
    with pytest.raises(TypeError, match=r"optimizer.grad_scale, which torch.amp.GradScaler.step sets"):
        opt.step()
    opt.grad_scale, opt.found_inf = None, torch.zeros(2, device=DEVICE)
    with pytest.raises(TypeError, match=r"optimizer.found_inf.*one-element floating-point tensor, got Tensor \(2,\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_sgd_sai_measures_at_the_first_step_gradscaler_lets_through(backend):
    """SGD-SaI's g-SNR is measured at a tensor's first counted step: the first two here are skipped (found_inf), so
    it is taken at the third, from the unscaled gradient, and the run equals one that starts there, bit for bit (the
    scale is a power of two). A skipped step leaves the g-SNR as it was, and the pre-pass runs again after it."""
    a, b = make_params(DEVICE, seed=11), make_params(DEVICE, seed=11)
    hyper = dict(lr=1e-2, momentum=0.8, eps=1e-3, weight_decay=0.1, backend=backend)
    ours, plain = uf.SGDSaI(a, **hyper), uf.SGDSaI(b, **hyper)
    gen = torch.Generator().manual_seed(12)
    for t in range(5):
        grads = random_grads(a, gen)
        for p, g in zip(a, grads):
            p.grad = g * 8.0
        snap = _snapshot(ours, a)
        ours.grad_scale = torch.full((), 8.0, device=DEVICE)
        ours.found_inf = torch.full((1,), float(t < 2), device=DEVICE)
        ours.step()
        if t < 2:
            _assert_unchanged(ours, a, snap, f"{backend} step {t}")
            assert all(float(ours.state[p]["step"]) == 0.0 for p in a)
            continue
        for p, g in zip(b, grads):
            p.grad = g
        plain.step()
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"{backend} step {t}: param {i} differs from the run that starts here"
            assert torch.equal(ours.state[p]["gsnr"], plain.state[q]["gsnr"]), f"{backend} step {t}: param {i}"
