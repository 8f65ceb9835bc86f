"""Optimizer state in bfloat16 (state_dtype=torch.bfloat16): rounded stochastically after every update by default
(state_rounding="stochastic", from the counter-based random bits of backends/rounding.py, one stream per state slot),
to nearest as the control (state_rounding="nearest").

- Every state element lands on the bfloat16 neighbour of the float64 oracle's value that the oracle drawing the same
  random bits picks, and the parameter follows the oracle's update from the unrounded moments, on every backend.
- Every backend draws the same bits: exact parity of the state across backends.
- Rounding to nearest stalls a slow moving average; stochastic rounding follows float32's on average.
- Errors, state dicts (torch.optim's float32 state in and out, a resumed run, DCP on a DTensor mesh).
"""

import copy

import numpy as np
import pytest
import torch

import uba_fused as uf
from uba_fused.backends import rounding
from uba_fused.registry import RULES

import oracle
from harness import CASES, f64, one_rank_mesh, random_grads, set_grads, step_together
from test_kernels import DEVICE, EVERY_BACKEND
from test_precision import _MARKS, _oracle_round, _params

BY_ID = {c.id: c for c in CASES}
BF16 = torch.bfloat16

# Pairwise: each backend with two rules, every rule on at least one kernel backend.
# AdamP's moments are Adam's, projected after: its bf16 state once, on the CUDA kernel's host build.
ORACLE = [("adamw", "torch"), ("adan", "torch"), ("adabelief", "cpu"), ("sgd-nesterov", "cpu"),
          ("adamw", "triton"), ("sgd-nesterov", "triton"), ("adan", "cuda"), ("adabelief", "cuda"), ("adamp", "cuda")]


def _within_float32_error(x64, terms, r, frac):
    """Draws the kernels' float32 arithmetic may decide otherwise than the float64 oracle: r within a float32 error
    of the threshold, as a fraction of the spacing. ``terms`` bounds the magnitude of what was summed for x (a few
    float32 roundings of it: 2^-21 of it), plus 1e-3 of a spacing for the oracle's own test."""
    spacing = np.abs(x64) * 2.0**-7 + 1e-45  # bfloat16 keeps 8 significant bits: a spacing is >= |x| 2^-8
    return np.abs(r / 2.0**16 - (1.0 - frac)) < 1e-3 + terms * 2.0**-21 / spacing


@pytest.mark.parametrize("case_id, backend", [pytest.param(c, b, id=f"{c}-{b}", marks=_MARKS[b])
                                              for c, b in ORACLE if b in _MARKS])
def test_bfloat16_state_lands_where_the_float64_oracle_drawing_the_same_bits_lands(case_id, backend):
    case = BY_ID[case_id]
    params = _params(torch.float32, seed=20)
    opt = case.make(params, backend=backend, state_dtype=BF16, seed=91)
    names = RULES[case.rule].states
    gen = torch.Generator().manual_seed(21)
    ambiguous = total = 0
    for t in range(4):
        grads = random_grads(params, gen)
        set_grads(params, grads)
        before = [(f64(p), {n: f64(opt.state[p][n]) for n in names} if p in opt.state else None) for p in params]
        opt.step()
        for slot, (p, g, (p0, s0)) in enumerate(zip(params, grads, before)):
            if p.numel() == 0:
                continue
            s0 = s0 or {n: np.zeros_like(p0) for n in names}
            hyper = case.hyper(opt.param_groups[0])
            x64, s64 = oracle.RULES[case.rule](p0, f64(g), s0, t + 1, lr=case.kwargs["lr"], **hyper)
            biggest = np.max([np.abs(v) for v in s0.values()], axis=0)
            terms_of = np.abs(p0) + np.abs(f64(g)) + biggest + (np.abs(f64(g)) + biggest) ** 2
            for j, n in enumerate(names):
                stored = opt.state[p][n]
                assert stored.dtype == BF16, f"{n} is {stored.dtype}"
                r = rounding.random_bits(stored, 91, slot, torch.tensor(t), 1 + j).cpu().numpy()
                want, frac = _oracle_round(s64[n], r)
                got = f64(stored)
                near = _within_float32_error(s64[n], terms_of + np.abs(s0[n]), r, frac)
                bad = (got != want) & ~near
                assert not bad.any(), (f"{case_id}/{backend} step {t} param {slot} {n}: {bad.sum()} of {got.size} "
                                       f"elements off the oracle's choice, e.g. {got[bad][:3]} for {want[bad][:3]}")
                ambiguous += int(((got != want) & near).sum())
                total += got.size
            # the parameter moves by the unrounded moments: float32 arithmetic of float64's update
            err = np.abs(f64(p) - x64)
            assert (err <= 1e-5 * np.abs(x64) + 1e-6 * case.kwargs["lr"]).all(), \
                f"{case_id}/{backend} step {t} param {slot}: off the oracle's update by {err.max():.2e}"
    assert ambiguous <= 1e-3 * total, f"{ambiguous} of {total} draws decided otherwise than the oracle near a threshold"


@pytest.mark.parametrize("how", ["stochastic", "nearest"])
@pytest.mark.parametrize("backend", [b for b in EVERY_BACKEND if getattr(b, "values", [b])[0] != "torch"])
def test_every_backend_writes_the_same_state_bits(backend, how):
    """SGD's momentum buffer is the same float32 value in the kernels as in the reference (b * buf + (1 - d) g, the
    first one g), so its bfloat16 rounding, stochastic from the same (seed, t, tensor, element, slot) or to nearest,
    must be bit for bit the same. Backend "cpu" runs torch's fused CPU kernel, whose float32 arithmetic may differ in
    the last bit (measured: 1 element in 13K over 4 steps): there, a draw may differ on such an element, by one
    bfloat16 spacing, on at most 1e-3 of them. The parameters follow within float32's rounding."""
    runs = []
    for name in ("torch", backend):
        params = _params(torch.float32, seed=22)
        runs.append((params, uf.SGD(params, lr=0.05, momentum=0.9, dampening=0.1, backend=name, state_dtype=BF16,
                                    seed=4, state_rounding=how)))
    step_together(runs, torch.Generator().manual_seed(23), steps=4)
    (a, opt_a), (b, opt_b) = runs
    for i, (p, q) in enumerate(zip(a, b)):
        if p.numel():
            s, u = opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"]
            differ = s.view(torch.int16) != u.view(torch.int16)
            if backend == "cpu":
                apart = (s.view(torch.int16).int() - u.view(torch.int16).int()).abs()
                assert differ.sum() <= max(1, 1e-3 * s.numel()) and (apart[differ] == 1).all(), f"param {i}"
            else:
                assert not differ.any(), f"param {i}: {differ.sum()} of {s.numel()} differ"
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_MARKS[b]) for b in ("torch", "cpu") if b in _MARKS])
def test_nearest_stalls_a_slow_average_and_stochastic_rounding_follows_float32(backend):
    """AdamW's second moment under a constant gradient 1 (b2 = 0.999, from 0): float32's is 1 - 0.999^t. In bfloat16
    rounded to nearest it stops where 0.001 (1 - v) is under half a spacing (v >= 1/4: 2^-10); rounded
    stochastically, each element is unbiased, and the mean of 4096 elements stays within 15 standard deviations of
    the float32 value (each element's rounding noise, at most a spacing 2^-9 per step and decaying by b2 per step,
    has a standard deviation under 2^-9 sqrt(1 / (4 (1 - b2^2))) = 0.022)."""
    steps = 600
    runs = {}
    for how in ("stochastic", "nearest", None):
        p = torch.zeros(4096, device=DEVICE, requires_grad=True)
        extra = {} if how is None else dict(state_dtype=BF16, state_rounding=how)
        opt = uf.AdamW([p], lr=0.0, betas=(0.9, 0.999), backend=backend, **extra)
        p.grad = torch.ones_like(p)
        for _ in range(steps):
            opt.step()
        runs[how] = opt.state[p]["exp_avg_sq"].double()
    exact = 1 - 0.999**steps
    assert abs(runs[None].mean().item() - exact) < 1e-4
    assert runs["nearest"].max().item() < 0.26, "rounding to nearest stalls near 1/4"
    assert abs(runs["stochastic"].mean().item() - exact) < 15 * 0.022 / 64
    assert runs["stochastic"].std().item() > 0, "elements draw their own bits"


@pytest.mark.parametrize("kwargs, params, match", [
    (dict(state_dtype=torch.float16), None, "state_dtype=torch.float16 is not supported: float16 cannot hold"),
    (dict(state_dtype=BF16), [torch.zeros(3), torch.zeros(2, dtype=torch.float16)],
     r"state_dtype=torch.bfloat16 would keep the state of the float16 parameters \[1\] of this group in bfloat16"),
    (dict(state_dtype=BF16), [torch.zeros(2, dtype=torch.float64)],
     r"state_dtype=torch.bfloat16 would keep the state of the float64 parameters \[0\] .* less precision"),
    (dict(state_rounding="up"), None, "state_rounding must be None, 'nearest' or 'stochastic', got 'up'"),
    (dict(state_rounding="stochastic"), [torch.zeros(3, dtype=BF16), torch.zeros(2, dtype=torch.float16)],
     r"state_rounding='stochastic' rounds bfloat16 state, but the state of the float16 parameters \[1\]"),
])
def test_bad_state_options_raise_at_construction(kwargs, params, match):
    with pytest.raises(ValueError, match=match):
        uf.Adan([torch.zeros(3, requires_grad=True)] if params is None else params, **kwargs)


def test_state_rounding_defaults_by_where_the_dtype_comes_from():
    """None: stochastic for a bfloat16 state asked for, nearest for state kept in the parameter's dtype (as
    torch.optim keeps a bfloat16 parameter's state); either can be asked for."""
    from uba_fused.backends.work import state_rounding_of
    assert state_rounding_of({"state_dtype": BF16, "state_rounding": None}) == "stochastic"
    assert state_rounding_of({"state_dtype": None, "state_rounding": None}) == "nearest"
    assert state_rounding_of({"state_dtype": BF16, "state_rounding": "nearest"}) == "nearest"
    assert state_rounding_of({"state_dtype": None, "state_rounding": "stochastic"}) == "stochastic"
    assert state_rounding_of({}) == "nearest"  # a group pickled before the options existed


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_bfloat16_state_dicts_resume_and_convert(backend):
    """A run saved and resumed continues bit for bit (the random bits are keyed by the group's step counter, which
    the state dict carries); torch.optim.AdamW's float32 state loads rounded to nearest, and bfloat16 state loads
    into a float32-state optimizer exactly."""
    gen = torch.Generator().manual_seed(24)
    a = [torch.randn(300, generator=gen).to(DEVICE).requires_grad_(), torch.randn(7, 9, generator=gen).to(DEVICE)
         .requires_grad_()]
    grads = [random_grads(a, gen) for _ in range(5)]
    opt = uf.AdamW(a, lr=1e-2, state_dtype=BF16, backend=backend, seed=6)
    for gs in grads[:3]:
        set_grads(a, gs)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    b = [p.detach().clone().requires_grad_() for p in a]
    again = uf.AdamW(b, lr=1e-2, backend=backend)  # state_dtype and seed come from the state dict
    again.load_state_dict(sd)
    assert again.param_groups[0]["state_dtype"] == BF16 and again.param_groups[0]["seed"] == 6
    for gs in grads[3:]:
        for params, o in ((a, opt), (b, again)):
            set_grads(params, gs)
            o.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q) and all(torch.equal(opt.state[p][n], again.state[q][n]) for n in opt.state[p])

    c = [p.detach().clone().requires_grad_() for p in a]
    ref = torch.optim.AdamW(c, lr=1e-2)
    set_grads(c, grads[0])
    ref.step()
    narrow = uf.AdamW([p.detach().clone().requires_grad_() for p in a], lr=1e-2, state_dtype=BF16, backend=backend)
    narrow.load_state_dict({**ref.state_dict(), "param_groups": [{**g, "state_dtype": BF16}
                                                                 for g in ref.state_dict()["param_groups"]]})
    for p, q in zip(c, narrow.param_groups[0]["params"]):
        for n in ("exp_avg", "exp_avg_sq"):
            s = narrow.state[q][n]
            assert s.dtype == BF16 and torch.equal(s, ref.state[p][n].to(BF16)), f"{n}: rounded to nearest"
    wide = uf.AdamW([p.detach().clone().requires_grad_() for p in a], lr=1e-2, backend=backend)
    wide.load_state_dict({**sd, "param_groups": [{**g, "state_dtype": None} for g in sd["param_groups"]]})
    for i, q in enumerate(wide.param_groups[0]["params"]):
        for n in ("exp_avg", "exp_avg_sq"):
            s = wide.state[q][n]
            assert s.dtype == torch.float32 and torch.equal(s, sd["state"][i][n].float()), f"{n}: exactly"


def test_dcp_checkpoint_of_bfloat16_state_on_a_dtensor_mesh_resumes_bit_for_bit(tmp_path):
    """FSDP2's state: bfloat16 DTensors placed as their parameters, saved by torch.distributed.checkpoint and
    loaded into a fresh optimizer (one rank over gloo), continuing as the uninterrupted run."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.tensor import DTensor, Shard
    with one_rank_mesh() as mesh:
        gen = torch.Generator().manual_seed(25)
        start = [torch.randn(6, 5, generator=gen), torch.randn(11, generator=gen)]
        grads = [[torch.randn(s.shape, generator=gen) for s in start] for _ in range(5)]

        def model():
            return [torch.nn.Parameter(DTensor.from_local(s.clone(), mesh, [Shard(0)])) for s in start]

        def step(ps, opt, gs):
            for p, g in zip(ps, gs):
                p.grad = DTensor.from_local(g, mesh, [Shard(0)])
            opt.step()

        a = model()
        opt = uf.Adan(a, lr=1e-2, state_dtype=BF16, seed=8, backend="torch")
        for gs in grads[:3]:
            step(a, opt, gs)
        dcp.save({"opt": opt.state_dict()}, checkpoint_id=str(tmp_path))
        b = model()
        again = uf.Adan(b, lr=1e-2, state_dtype=BF16, seed=8, backend="torch")
        step(b, again, [torch.zeros(s.shape) for s in start])  # makes the state a load writes into
        with torch.no_grad():  # the model's own checkpoint
            for p, q in zip(a, b):
                q.copy_(p)
        held = {"opt": again.state_dict()}
        dcp.load(held, checkpoint_id=str(tmp_path))
        again.load_state_dict(held["opt"])
        for gs in grads[3:]:
            step(a, opt, gs)
            step(b, again, gs)
        for p, q in zip(a, b):
            assert torch.equal(p.to_local(), q.to_local())
            for n in RULES["adan"].states:
                s = again.state[q][n]
                assert isinstance(s, DTensor) and s.to_local().dtype == BF16
                assert torch.equal(opt.state[p][n].to_local(), s.to_local())

