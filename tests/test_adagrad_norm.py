"""AdaGrad-Norm (issue #24, part 4: AdAdaGrad's scalar variant): ``uf.AdagradNorm`` against an independent float64
re-derivation of Ward, Wu and Bottou's update (one accumulator b2 of the squared global gradient norms, every gradient
divided by sqrt(b2) + eps), on every backend, under a schedule, two param groups, a parameter without a gradient and
GradScaler's hand-over (a skipped step included); its state dict, its errors and a captured step."""

import math

import numpy as np
import pytest
import torch

import uba_fused as uf

from harness import capture_step, f64, make_params, random_grads, set_grads, step_scaled

from test_kernels import DEVICE, EVERY_BACKEND, gpu


def _oracle_step(ref: list[np.ndarray], grads: list, lrs: list[float], acc: float, eps: float) -> float:
    """One AdaGrad-Norm step of the float64 copies ``ref`` (in place), each with its group's lr; returns b2."""
    acc += sum(float(np.square(f64(g)).sum()) for g in grads if g is not None)
    divisor = math.sqrt(acc) + eps
    for r, g, lr in zip(ref, grads, lrs):
        if g is not None:
            r -= lr * f64(g) / divisor
    return acc


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_adagrad_norm_is_the_published_update(backend):
    """Six steps of two param groups (lrs 0.1 and 0.05, a Linear schedule): a parameter without a gradient at step 1,
    GradScaler's hand-over at step 2 (scale 1024) and at step 3 with an inf gradient, which it skips (no change, b2
    kept). Every parameter and b2 equal the float64 re-derivation (the divisor is rounded to float32, as the kernels
    take it)."""
    params = make_params(DEVICE, seed=21)
    first, second = params[:2], params[2:]
    schedule = uf.Linear(6, warmup_steps=1)
    opt = uf.AdagradNorm([{"params": first}, {"params": second, "lr": 0.05}], lr=0.1, initial_accumulator_value=0.3,
                         eps=0.5, schedule=schedule, backend=backend)
    ref, acc = [f64(p) for p in params], 0.3
    lrs = [0.1] * len(first) + [0.05] * len(second)
    gen = torch.Generator().manual_seed(22)
    for t in range(6):
        grads = random_grads(params, gen, skip=3 if t == 1 else None)
        if t == 3:  # an inf gradient under a scaler: the step is skipped
            set_grads(params, [None if g is None else g * 8.0 for g in grads])
            params[0].grad[0] = math.inf
            opt.grad_scale = torch.full((1,), 8.0, device=DEVICE)
            opt.found_inf = torch.ones((1,), device=DEVICE)
            opt.step()
            del opt.grad_scale, opt.found_inf
        else:
            step_scaled(opt, params, grads, 1024.0 if t == 2 else None)
            acc = _oracle_step(ref, grads, [lr * schedule.factor(t) for lr in lrs], acc, 0.5)
        assert float(opt.norm_sum) == pytest.approx(acc, rel=1e-6), t
    for i, (p, r) in enumerate(zip(params, ref)):
        np.testing.assert_allclose(f64(p), r, rtol=2e-6, atol=1e-7, err_msg=f"params[{i}] on {backend}")
    assert opt.norm_sum.dtype == torch.float64 and opt.param_groups[0]["norm_sum"] is opt.norm_sum


def test_adagrad_norm_state_dict_round_trip_continues_exactly(tmp_path):
    """Saved after 3 steps (torch.save, read with weights_only=True) and loaded into a fresh optimizer, the run goes on
    bit for bit as the uninterrupted one, b2 included; the loaded sum is the optimizer's own tensor, not the saved
    one's."""
    a, b = make_params(seed=31), make_params(seed=31)
    opt_a = uf.AdagradNorm(a, lr=0.2, backend="cpu")
    opt_b = uf.AdagradNorm(b, lr=0.2, backend="cpu")
    gen = torch.Generator().manual_seed(32)
    grads = [random_grads(a, gen) for _ in range(5)]
    for g in grads[:3]:
        set_grads(a, g)
        opt_a.step()
        set_grads(b, g)
        opt_b.step()
    torch.save(opt_b.state_dict(), tmp_path / "opt.pt")
    opt_c = uf.AdagradNorm(b, lr=0.2, backend="cpu")
    opt_c.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt_c.norm_sum is not opt_b.norm_sum and float(opt_c.norm_sum) == float(opt_b.norm_sum) > 0
    for g in grads[3:]:
        set_grads(a, g)
        opt_a.step()
        set_grads(b, g)
        opt_c.step()
    assert float(opt_c.norm_sum) == float(opt_a.norm_sum)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=0.9), "momentum must be 0.0"),
    (dict(weight_decay=0.1), "weight_decay must be 0.0"),
    (dict(max_grad_norm=1.0), "max_grad_norm must be 0"),
    (dict(eps=0.0), "eps or initial_accumulator_value must be > 0"),
    (dict(initial_accumulator_value=-1.0), "initial_accumulator_value must be finite"),
])
def test_adagrad_norm_bad_arguments_raise(kwargs, match):
    p = torch.randn(3, generator=torch.Generator().manual_seed(41))
    extra = {k: v for k, v in kwargs.items() if k in ("eps", "initial_accumulator_value")}
    group = {"params": [p], **{k: v for k, v in kwargs.items() if k not in extra}}
    with pytest.raises((ValueError, TypeError), match=match):
        uf.AdagradNorm([group], **extra)


def test_adagrad_norm_refuses_a_second_accumulator_and_a_bad_loaded_sum():
    """eps and initial_accumulator_value are the one accumulator's: a param group with others raises. A state dict
    whose norm_sum is not a float64 0-dim tensor raises before anything changes."""
    gen = torch.Generator().manual_seed(42)
    p, q = torch.randn(3, generator=gen), torch.randn(4, generator=gen)
    opt = uf.AdagradNorm([p], lr=0.1)
    with pytest.raises(ValueError, match="eps belongs to the one accumulator"):
        opt.add_param_group({"params": [q], "eps": 1e-3})
    p.grad = torch.randn(3, generator=gen)
    opt.step()
    before, sd = float(opt.norm_sum), opt.state_dict()
    sd["param_groups"][0]["norm_sum"] = torch.zeros(2)
    with pytest.raises(ValueError, match="norm_sum must be a float64 0-dim tensor"):
        opt.load_state_dict(sd)
    assert float(opt.norm_sum) == before and before > 0


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_adagrad_norm_captured_step_accumulates_on_replay(backend):
    """A CUDA graph of the step: each replay adds the new gradients' squared norm into b2 and divides by it, as eager
    steps do (no host value is baked in)."""
    a, b = make_params("cuda", seed=51), make_params("cuda", seed=51)
    opt_a, opt_b = uf.AdagradNorm(a, lr=0.1, backend=backend), uf.AdagradNorm(b, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(52)
    grads = [random_grads(a, gen) for _ in range(4)]
    for opt, ps in ((opt_a, a), (opt_b, b)):
        set_grads(ps, grads[0])
        opt.step()
    set_grads(b, grads[1])
    graph = capture_step(opt_b)
    for g in grads[1:]:
        set_grads(a, g)
        opt_a.step()
        for x, y in zip(b, g):
            x.grad.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    assert float(opt_b.norm_sum) == float(opt_a.norm_sum)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
