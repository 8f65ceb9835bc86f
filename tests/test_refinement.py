"""Schedules from the gradient norms a run recorded (issue #24, part 2 and 3): ``opt.record_grad_norms`` against
``torch.linalg.vector_norm`` of the gradients at each step, on every backend, clipped or not; ``uf.Refined`` against
the refinement recipe of Defazio et al. (arXiv 2310.07831) re-derived in float64 with scipy's median filter, as the
authors' code filters."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

import uba_fused as uf
from uba_fused.schedules import refined_factors

from harness import (capture_step, make_params, one_rank_mesh, random_grads, set_grads, step_scaled,
                     step_together)

from test_kernels import DEVICE, EVERY_BACKEND


# ---------------------------------------------------------------- the recorded history
def _global_norm(grads, ord):
    return float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads if g is not None]), ord))


_RECORDED = {"adamw-l1": (lambda ps, **kw: uf.AdamW(ps, lr=1e-3, **kw), 1, 0.0),
             "adamw-l1-clipped": (lambda ps, **kw: uf.AdamW(ps, lr=1e-3, **kw), 1, 0.5),
             "sgd-l2": (lambda ps, **kw: uf.SGD(ps, lr=0.1, momentum=0.9, **kw), 2, 0.0),
             "sgd-l2-clipped": (lambda ps, **kw: uf.SGD(ps, lr=0.1, momentum=0.9, **kw), 2, 0.5)}


def _pairwise() -> list:
    """Each backend with both norms and both clipping settings, and each (norm, clipping) pair on two backends."""
    out = []
    for i, b in enumerate(EVERY_BACKEND):
        name, marks = (b.values[0], b.marks) if hasattr(b, "values") else (b, ())
        for case in ("adamw-l1", "sgd-l2-clipped") if i % 2 == 0 else ("adamw-l1-clipped", "sgd-l2"):
            out.append(pytest.param(*_RECORDED[case], name, marks=marks, id=f"{case}-{name}"))
    return out


@pytest.mark.parametrize("make,ord,clip,backend", _pairwise())
def test_recorded_norms_are_the_gradients_norms_at_each_step(make, ord, clip, backend):
    """Five steps into a history of 3: steps 0..2 hold each step's norm of the gradients as backward left them (a
    parameter without a gradient at step 1; GradScaler's hand-over at step 2, its scale divided out), the hidden slot
    the last step past the budget; the L2 rules' grad_norm is the same norm."""
    params = make_params(DEVICE, seed=11)
    opt = make(params, max_grad_norm=clip, backend=backend)
    assert opt.grad_norms_ord == ord and opt.grad_norms is None
    history = opt.record_grad_norms(3)
    assert history.shape == (3,) and history.dtype == torch.float32 and bool(history.isnan().all())
    gen, want = torch.Generator().manual_seed(12), []
    for t in range(5):
        grads = random_grads(params, gen, skip=3 if t == 1 else None)
        want.append(_global_norm(grads, ord))
        step_scaled(opt, params, grads, 512.0 if t == 2 else None)
        if ord == 2:
            assert float(opt.grad_norm) == pytest.approx(want[-1], rel=1e-6), t
    assert opt.grad_norms.data_ptr() == history.data_ptr()  # one tensor, written in place
    assert history.tolist() == pytest.approx(want[:3], rel=1e-6)
    assert float(opt.param_groups[0]["grad_norms"][3]) == pytest.approx(want[4], rel=1e-6)


def test_recording_leaves_the_steps_as_they_were():
    """A history changes nothing the step computes: parameters and state equal a run that does not record,
    bit for bit (the L2 pre-pass it runs is handed to no group when none clips)."""
    a, b = make_params(seed=13), make_params(seed=13)
    opt_a, opt_b = uf.SGD(a, lr=0.1, momentum=0.9, backend="cpu"), uf.SGD(b, lr=0.1, momentum=0.9, backend="cpu")
    opt_a.record_grad_norms(10)
    step_together([(a, opt_a), (b, opt_b)], torch.Generator().manual_seed(14), 3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert not opt_a.grad_norms[:3].isnan().any() and opt_a.grad_norms[3:].isnan().all()


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_a_step_with_a_non_finite_gradient_records_inf(bad):
    """A gradient with an inf or NaN (a step GradScaler skips) records inf, so that NaN keeps meaning a step never
    recorded, and Refined weighs it as a norm too large to count."""
    params = make_params(seed=15)
    opt = uf.AdamW(params, lr=1e-3, backend="torch")
    opt.record_grad_norms(4)
    grads = random_grads(params, torch.Generator().manual_seed(16))
    grads[0][2] = float(bad)
    set_grads(params, grads)
    opt.step()
    assert opt.grad_norms[0].item() == math.inf and opt.grad_norms[1:].isnan().all()


def test_the_history_survives_a_state_dict_round_trip(tmp_path):
    """Saved in param group 0 (torch.load(weights_only=True) reads it; DCP's optimizer state dict keeps param groups),
    a resumed run goes on writing where the first stopped: the history equals an uninterrupted run's."""
    def run(opt, params, gen, steps):
        for _ in range(steps):
            set_grads(params, random_grads(params, gen))
            opt.step()

    a, b = make_params(seed=17), make_params(seed=17)
    opt_a = uf.Lion(a, lr=1e-3, backend="cpu", schedule=uf.Linear(6))
    opt_a.record_grad_norms(6)
    gen_a, gen_b = torch.Generator().manual_seed(18), torch.Generator().manual_seed(18)
    run(opt_a, a, gen_a, 6)
    opt_b = uf.Lion(b, lr=1e-3, backend="cpu", schedule=uf.Linear(6))
    opt_b.record_grad_norms(6)
    run(opt_b, b, gen_b, 3)
    torch.save(opt_b.state_dict(), tmp_path / "opt.pt")
    resumed = uf.Lion(b, lr=1e-3, backend="cpu", schedule=uf.Linear(6))
    assert resumed.grad_norms is None
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run(resumed, b, gen_b, 3)
    assert torch.equal(resumed.grad_norms, opt_a.grad_norms) and not resumed.grad_norms.isnan().any()
    assert resumed.record_grad_norms(None) is None and resumed.grad_norms is None


def test_dtensors_placed_several_ways_record_the_full_models_norms():
    """A one-rank mesh with Shard(0), Shard(1) and Replicate() parameters (two classes of sums: each row summed over
    its own): the L1 and the L2 history equal the plain tensors' norms."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    with one_rank_mesh() as mesh:
        gen = torch.Generator().manual_seed(19)
        plain = [torch.randn(4, 3, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(6, generator=gen)]
        for cls, ord in ((uf.AdamW, 1), (uf.SGD, 2)):
            placed = [torch.nn.Parameter(DTensor.from_local(t.clone(), mesh, [pl]))
                      for t, pl in zip(plain, (Shard(0), Shard(1), Replicate()))]
            opt = cls(placed, lr=1e-3, backend="torch")
            opt.record_grad_norms(2)
            want = []
            for _ in range(2):
                grads = [torch.randn(t.shape, generator=gen) for t in plain]
                want.append(_global_norm(grads, ord))
                for p, g in zip(placed, grads):
                    p.grad = DTensor.from_local(g, mesh, p.placements)
                opt.step()
            assert opt.grad_norms.tolist() == pytest.approx(want, rel=1e-6), cls.__name__


@pytest.mark.parametrize("call,error,match", [
    (lambda opt: opt.record_grad_norms(0), ValueError, "total_steps must be >= 1"),
    (lambda opt: opt.record_grad_norms(2.5), TypeError, "total_steps must be an integer"),
    (lambda opt: opt.param_groups[0].__setitem__("grad_norms", torch.zeros(5, dtype=torch.float64)), ValueError,
     "grad_norms must be a 1-D float32 tensor"),
    (lambda opt: opt.param_groups[0].__setitem__("grad_norms", torch.zeros(1)), ValueError,
     "grad_norms must be a 1-D float32 tensor of at least 2"),
])
def test_bad_histories_are_refused_before_any_change(call, error, match):
    params = make_params(seed=20)
    opt = uf.AdamW(params, lr=1e-3, backend="torch")
    set_grads(params, random_grads(params, torch.Generator().manual_seed(21)))
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=match):
        call(opt)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not opt.state


def test_a_loaded_history_of_the_wrong_kind_is_refused_before_any_change():
    params = make_params(seed=22)
    opt = uf.SGD(params, lr=0.1, backend="torch")
    opt.record_grad_norms(4)
    sd = opt.state_dict()
    sd["param_groups"][0]["grad_norms"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: grad_norms must be a 1-D float32 tensor"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["grad_norms"].shape == (5,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("cls", [uf.AdamW, uf.SGD])
def test_gpu_a_captured_step_records_at_every_replay_and_never_syncs(backend, cls):
    """A graph's replays write each step's norm at its own index, reading the gradients each replay finds, and
    nothing syncs."""
    gen = torch.Generator().manual_seed(23)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen).cuda())
    p.grad = torch.randn(5000, generator=gen).cuda()
    opt = cls([p], lr=1e-3, backend=backend)
    opt.record_grad_norms(8)
    opt.step()
    graph = capture_step(opt)
    want = [float(torch.linalg.vector_norm(p.grad.double(), opt.grad_norms_ord))]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(1, 8):
            p.grad.mul_(0.5)
            graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want += [want[0] * 0.5 ** t for t in range(1, 8)]
    assert opt.grad_norms.tolist() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- Refined
def _authors_recipe(norms: np.ndarray, ord: int, smoothing: float) -> np.ndarray:
    """The refinement in float64, as the authors' code computes it (facebookresearch/adaptive_scheduling): a median
    filter of odd width about smoothing * n over the norms padded by reflection at their end ('nearest' at their
    start), weights lam_t = g_t^-ord, w_t = lam_t * sum_{s > t} lam_s (0 at the last step), over their maximum."""
    n = len(norms)
    width = 2 * (int(smoothing * n) // 2) + 1
    pad = 2 * width
    smooth = median_filter(np.pad(norms, (0, pad), mode="reflect"), size=width, mode="nearest")[:-pad]
    lam = smooth ** -float(ord)
    w = np.array([lam[t] * lam[t + 1:].sum() for t in range(n)])
    return w / w.max()


@pytest.mark.parametrize("n,ord,smoothing", [(2, 2, 0.1), (3, 1, 1.0), (57, 2, 0.1), (57, 1, 0.5), (400, 1, 0.1),
                                             (400, 2, 1.0)])
def test_refined_is_the_authors_recipe(n, ord, smoothing):
    """Log-normal norms around a falling trend, with two inf entries (steps GradScaler skipped) where n allows:
    Refined's factors equal the float64 recipe to float32 rounding."""
    gen = torch.Generator().manual_seed(n * 10 + ord)
    norms = (torch.randn(n, generator=gen, dtype=torch.float64).exp() * torch.linspace(3, 1, n, dtype=torch.float64))
    if n >= 57:
        norms[[5, n // 2]] = math.inf
    want = _authors_recipe(norms.numpy(), ord, smoothing)
    np.testing.assert_allclose(refined_factors(norms, ord=ord, smoothing=smoothing).numpy(), want, rtol=1e-12,
                               atol=1e-15)
    table = uf.Refined(norms.float(), ord=ord, smoothing=smoothing)
    assert isinstance(table, uf.Table) and table.total_steps == n and table.factors.dtype == torch.float32
    np.testing.assert_allclose(table.factors.numpy(), _authors_recipe(norms.float().double().numpy(), ord, smoothing),
                               rtol=1e-6, atol=1e-7)
    assert table.factors[-1] == 0 and table.factors.max() == 1


@pytest.mark.parametrize("ord", [1, 2])
@pytest.mark.parametrize("n", [2, 10, 101])
def test_constant_norms_refine_to_linear_decay(n, ord):
    """The paper: with nothing known of the norms (constant ones) the refined schedule is linear decay to 0,
    (T - 1 - t) / (T - 1), whichever the norm."""
    want = torch.arange(n - 1, -1, -1, dtype=torch.float64) / (n - 1)
    torch.testing.assert_close(refined_factors(torch.full((n,), 3.7), ord=ord), want, rtol=1e-14, atol=1e-15)


def test_large_early_norms_make_a_warmup_and_warmup_steps_adds_one():
    """Norms falling 100x over the first tenth of the run: the refined schedule rises to its peak (a warmup of its
    own), then decays to 0; warmup_steps multiplies the first steps by (t + 1) / W on top."""
    n = 200
    norms = torch.cat([torch.logspace(2, 0, 20, dtype=torch.float64), torch.ones(n - 20, dtype=torch.float64)])
    f = refined_factors(norms, ord=2, smoothing=0.02)
    peak = int(f.argmax())
    assert 10 < peak < 40 and f[0] < 0.01 and bool((f[1:peak + 1] >= f[:peak]).all())
    warm = refined_factors(norms, ord=2, smoothing=0.02, warmup_steps=50)
    ramp = torch.arange(1, 51, dtype=torch.float64) / 50
    torch.testing.assert_close(warm[:50], f[:50] * ramp, rtol=1e-15, atol=0)
    assert torch.equal(warm[50:], f[50:])


def test_a_longer_history_is_resampled_to_the_budget():
    """total_steps T < n: the smoothed norms at the run's fractions t / (T - 1), linearly interpolated; norms that
    fall linearly stay linear, so the factors are those of the linear norms at T points (a filter of width 1 at
    both lengths: the median of 3 at the end of a line is its last but one)."""
    norms = torch.linspace(4, 1, 301, dtype=torch.float64)
    torch.testing.assert_close(refined_factors(norms, ord=1, total_steps=31, smoothing=0.003),
                               refined_factors(torch.linspace(4, 1, 31, dtype=torch.float64), ord=1, smoothing=0.003),
                               rtol=1e-12, atol=1e-15)
    assert not torch.equal(refined_factors(norms, ord=1, total_steps=31, smoothing=0.003),
                           refined_factors(norms[:31], ord=1, smoothing=0.003))  # (resampled, not cut)


def test_a_refined_schedule_saves_as_its_table(tmp_path):
    """A group with a Refined schedule saves it as a Table; loaded with weights_only, the same factors."""
    p = torch.nn.Parameter(torch.randn(10, generator=torch.Generator().manual_seed(24)))
    refined = uf.Refined(torch.linspace(5, 1, 20), ord=1)
    opt = uf.AdamW([p], lr=1e-3, schedule=refined)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = uf.AdamW([p], lr=1e-3)
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert isinstance(other.param_groups[0]["schedule"], uf.Table)
    assert torch.equal(other.param_groups[0]["schedule"].factors, refined.factors)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(grad_norms=[1.0, 2.0, 3.0], ord=3), ValueError, "ord must be 1"),
    (dict(grad_norms=[1.0, 2.0, 3.0], ord=True), ValueError, "ord must be 1"),
    (dict(grad_norms=[1.0], ord=2), ValueError, "at least 2 norms"),
    (dict(grad_norms=torch.ones(3, 2), ord=2), ValueError, "1-D tensor"),
    (dict(grad_norms=[1.0, 2.0, 3.0], ord=2, total_steps=4), ValueError, "a history shorter than the budget"),
    (dict(grad_norms=[1.0, float("nan"), 3.0], ord=2), ValueError, r"grad_norms\[1\] = nan"),
    (dict(grad_norms=[1.0, 0.0, 3.0], ord=2), ValueError, r"must be > 0"),
    (dict(grad_norms=[1.0, -1.0, 3.0], ord=1), ValueError, r"must be > 0"),
    (dict(grad_norms=[1.0, 2.0, 3.0], ord=2, smoothing=0.0), ValueError, r"smoothing must be a real number in"),
    (dict(grad_norms=[1.0, 2.0, 3.0], ord=2, smoothing=1.5), ValueError, r"smoothing must be a real number in"),
    (dict(grad_norms=[1.0, 2.0, 3.0], ord=2, warmup_steps=3), ValueError, "warmup_steps must be < total_steps"),
    (dict(grad_norms=[1.0, math.inf, math.inf, 3.0], ord=2, smoothing=1.0), ValueError, "not finite"),
])
def test_bad_refinements_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        uf.Refined(**kwargs)
