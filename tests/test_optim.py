"""The host backends, "torch" (the readable spec) and "cpu" (torch's fused and foreach CPU paths), against
float64 re-derivations and against torch.optim."""

import copy
import math

import pytest
import torch

import uba_fused as uf

import oracle
from harness import (CASE_IDS, CASES, SCHEDULES, Case, assert_scaled_close, check_steps_against_oracle, f64,
                     make_params, one_rank_mesh, random_grads, set_grads, step_together)


HOST_BACKENDS = ("torch", "cpu")
ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")  # the kernel backends in their CPU test modes


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_host_backends_match_float64_oracle(case, schedule, backend):
    check_steps_against_oracle(case, schedule, backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_host_backends_low_and_high_precision(case, dtype, backend):
    check_steps_against_oracle(case, SCHEDULES["uba"], backend=backend, dtype=dtype, steps=6)


def _at_large_lr(case: Case) -> Case:
    """``case`` at lr 0.5, where the updates of the larger gradients span many 16-bit ulps (at the cases' own lr, 1e-2
    and less, a 16-bit update is about one ulp, and one left out may pass the oracle's 16-bit tolerance)."""
    return Case(case.id, case.cls, case.rule, {**case.kwargs, "lr": 0.5})


def _large_lr_cases() -> list:
    """Every rule on both host backends, and on one kernel backend in turn (its CPU mode), in bfloat16 and float16 in
    turn: pairs, not the product (the kernel cases run Triton's interpreter)."""
    cases = []
    for i, case in enumerate(CASES):
        dtype = (torch.bfloat16, torch.float16)[i % 2]
        for backend in ("torch", "cpu", ("triton", "cuda")[i // 2 % 2]):
            cases.append(pytest.param(case, backend, dtype, id=f"{case.id}-{backend}-{dtype}".replace("torch.", "")))
    return cases


@pytest.mark.parametrize("case,backend,dtype", _large_lr_cases())
def test_16_bit_parameters_move_as_the_oracle_says_at_a_large_lr(case, backend, dtype):
    """At the cases' own lr (1e-2 and less) a 16-bit parameter's update is about one of its ulps, so an update left
    out may pass the oracle's 16-bit tolerance: the fault of torch 2.11's fused CPU SGD (whole blocks not updated;
    test_a_fused_cpu_kernel_wrong_for_16_bit_parameters_is_not_handed_them) passed it in bfloat16 at lr 1e-2. At lr
    0.5 the updates of the larger gradients span many ulps."""
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    check_steps_against_oracle(_at_large_lr(case), SCHEDULES["uba"], backend=backend, dtype=dtype, steps=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_fused_cpu_kernel_wrong_for_16_bit_parameters_is_not_handed_them(monkeypatch, dtype):
    """torch 2.11 to 2.13's fused CPU SGD left the vectorised blocks of a 16-bit parameter un-updated
    (pytorch#191763): backend "cpu" handed it 16-bit parameters as they were, and SGD's parameters of 8 or more
    elements did not move (seen on torch 2.11, the GPU machine's; torch 2.14 has the fix). Here torch's kernel is
    given that fault (every whole block of 8 elements left as it was): the check at first use finds it, and the
    parameters go to the kernel as float32 copies, matching the float64 oracle."""
    from uba_fused.backends import cpu
    real = torch._fused_sgd_

    def skips_whole_blocks(params, grads, bufs, **kw):
        kept = [p.clone() for p in params]
        real(params, grads, bufs, **kw)
        for p, k in zip(params, kept):
            if p.dtype in (torch.bfloat16, torch.float16) and p.is_contiguous():
                whole = p.numel() // 8 * 8
                p.view(-1)[:whole].copy_(k.view(-1)[:whole])

    monkeypatch.setattr(torch, "_fused_sgd_", skips_whole_blocks)
    cpu._fused_is_right.cache_clear()
    try:
        assert not cpu._fused_is_right("sgd", dtype) and cpu._fused_is_right("adamw", dtype)
        check_steps_against_oracle(_at_large_lr(next(c for c in CASES if c.id == "sgd")), SCHEDULES["uba"],
                                   backend="cpu", dtype=dtype, steps=4)
    finally:
        cpu._fused_is_right.cache_clear()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_host_backends_keep_float32_state_of_16_bit_parameters(case, dtype, backend):
    # The state is compared at float32's tolerance: a value rounded to 16 bits on the way fails it.
    check_steps_against_oracle(case, SCHEDULES["uba"], backend=backend, dtype=dtype, steps=6,
                               state_dtype=torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clipping_scales_the_update_not_the_gradients(backend):
    # Adan's reference scales p.grad in place; here the gradients stay as backward left them.
    if uf.backends.availability("cpu")[backend] is not None:
        pytest.skip(uf.backends.availability("cpu")[backend])
    params = make_params()
    opt = uf.Adan(params, max_grad_norm=0.1, backend=backend)
    grads = random_grads(params, torch.Generator().manual_seed(3))
    set_grads(params, grads)
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "sgd-momentum"])
def test_max_grad_norm_is_clip_grad_norm_fused_into_the_step(name, backend):
    # torch.nn.utils.clip_grad_norm_ (in place, over every gradient) then torch.optim's step. Gradients at full
    # scale have a global norm of 0.5-10 (clipped to 0.4); every third step's are 1e-3 of that (not clipped).
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    _, ours, theirs = next(t for t in TORCH_TWINS if t[0] == name)
    a, b = make_params(), make_params()
    opt_a, opt_b = ours(a, backend=backend, max_grad_norm=0.4), theirs(b)
    gen = torch.Generator().manual_seed(6)
    clipped = []
    for t in range(9):
        grads = [None if g is None else g * (1e-3 if t % 3 == 2 else 1.0)
                 for g in random_grads(a, gen, skip=4 if t == 4 else None)]
        set_grads(a, grads)
        set_grads(b, grads)
        clipped.append(float(torch.nn.utils.clip_grad_norm_(b, 0.4)) > 0.4)
        opt_a.step()
        opt_b.step()
        for i, (p, q) in enumerate(zip(a, b)):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"step {t} param {i}: {m}")
    assert clipped == [True, True, False] * 3


# The rules with per-tensor norms, with hyper-parameters that make every term of their ratio count.
NORM_RULES = {"lars": (uf.LARS, oracle.lars, dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.05,
                                                   trust_coeff=0.01, eps=1e-8, trust_clip=False, always_adapt=False)),
              "lamb": (uf.LAMB, oracle.lamb, dict(bias_correction=True, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                                   grad_averaging=True, trust_clip=False, always_adapt=False,
                                                   max_grad_norm=None))}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("rule", NORM_RULES)
def test_per_tensor_norms_where_their_definition_matters_match_the_oracle(rule, backend):
    """LARS's and LAMB's per-tensor norms: a zero parameter (ratio 1), a zero gradient (LARS: ratio 1), a zero
    parameter with a zero gradient (LAMB: a zero direction, ratio 1), a tensor of three chunks and a tail (its sums
    added over work items), 1-element and 0-size tensors, and a parameter without a gradient (left as it is), on
    every backend against the float64 oracle, three steps."""
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    cls, rule_oracle, hyper = NORM_RULES[rule]
    gen = torch.Generator().manual_seed(21)
    shapes = [(5,), (3 * 4096 + 5,), (1,), (0,), (7,), (4,), (3,)]
    params = [torch.zeros(5)] + [torch.randn(s, generator=gen) for s in shapes[1:-1]] + [torch.zeros(3)]
    params = [p.requires_grad_() for p in params]
    opt = cls(params, lr=0.3, backend=backend, **hyper)
    state = [{} for _ in params]
    for t in range(3):
        grads = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
        grads[4], grads[5], grads[6] = torch.zeros(7), None, torch.zeros(3)
        want = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                want.append(f64(p))
                continue
            start = {"exp_avg": 0.0, "exp_avg_sq": 0.0, **state[i]}  # LAMB's moments start at 0
            exp_p, state[i] = rule_oracle(f64(p), f64(g), start, t + 1, 0.3, **hyper)
            want.append(exp_p)
        set_grads(params, grads)
        opt.step()
        for i, (p, w) in enumerate(zip(params, want)):
            assert_scaled_close(p, w, 2e-6, f"{backend} step {t} param {i}")
    assert not params[-1].any(), "a zero direction leaves its zero parameter at 0"


# AdamP's and SGDP's projection where its definition matters, with clipping on (its factor is in the gradient the
# sums see and the update applies).
# (AdamP's wd_ratio 1: a projected tensor's decay factor is then 1, which must not read as "not projected")
PROJECTING = {"adamp": (uf.AdamP, oracle.adamp, dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, delta=0.1,
                                                      wd_ratio=1.0, nesterov=False, max_grad_norm=1.0)),
              "sgdp": (uf.SGDP, oracle.sgdp, dict(momentum=0.8, dampening=0.1, weight_decay=0.1, nesterov=False,
                                                   eps=1e-8, delta=0.1, wd_ratio=0.2, max_grad_norm=1.0))}


def _orthogonal(p: torch.Tensor, g: torch.Tensor, rows: int) -> torch.Tensor:
    """g less its part along p in each of ``rows`` rows: a gradient nearly orthogonal to the weight there."""
    x, y = p.reshape(rows, -1).double(), g.reshape(rows, -1).double()
    y = y - (x * y).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True).clamp_min(1e-30) * x
    return y.reshape(g.shape).float()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("rule", PROJECTING)
def test_per_row_projection_where_its_definition_matters_matches_the_oracle(rule, backend):
    """Gradients orthogonal to the weight per row (projected per row) and as a whole only (projected whole), a zero
    parameter and a zero row (no radial part, the decay's factor still wd_ratio), a zero gradient, rows of several
    chunks and a tail, 1-element, 1-dim (never projected) and 0-size tensors of 2 dims, a parameter without a gradient,
    and the global clipping, on every backend against the float64 oracle, three steps."""
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    cls, rule_oracle, hyper = PROJECTING[rule]
    gen = torch.Generator().manual_seed(24)
    shapes = [(6, 5), (4, 3, 2), (4, 6), (3, 5), (3, 4), (2, 3 * 4096 + 5), (1, 1), (7,), (0, 5), (5, 0), (2, 3)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[2].zero_()
    params[3][1].zero_()
    params = [p.requires_grad_() for p in params]
    opt = cls(params, lr=0.05, backend=backend, **hyper)
    state, kept = [{} for _ in params], {k: v for k, v in hyper.items() if k != "max_grad_norm"}
    for t in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        grads[0] = _orthogonal(params[0].detach(), grads[0], 6)
        grads[1] = _orthogonal(params[1].detach(), grads[1], 1)
        grads[4], grads[10] = torch.zeros(3, 4), None
        norm = math.sqrt(sum(float(f64(g).__pow__(2).sum()) for g in grads if g is not None))
        scale = min(1.0, hyper["max_grad_norm"] / (norm + 1e-6))
        want = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                want.append(f64(p))
                continue
            start = {"exp_avg": 0.0, "exp_avg_sq": 0.0, "momentum_buffer": 0.0, **state[i]}
            exp_p, state[i] = rule_oracle(f64(p), f64(g) * scale, start, t + 1, 0.05, **kept)
            want.append(exp_p)
        set_grads(params, grads)
        opt.step()
        for i, (p, w) in enumerate(zip(params, want)):
            assert_scaled_close(p, w, 2e-6, f"{backend} step {t} param {i}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_per_row_projection_takes_any_layout_on_host_backends_and_rows_in_one_block_on_the_kernels(backend):
    """A transposed weight (dim 0 not outermost) runs on backends torch and cpu; the kernel backends, which sum each
    row as one block of memory, refuse it before anything changes, naming it; a channels_last conv weight (dim 0
    outermost) runs on every backend and matches backend torch."""
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(25)
    conv = torch.randn(4, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    transposed = torch.randn(5, 6, generator=gen).t()
    for weights, refused in (([conv], False), ([conv.clone(), transposed], backend in ("triton", "cuda"))):
        ours = [w.detach().clone().requires_grad_() for w in weights]
        ref = [w.detach().clone().contiguous().requires_grad_() for w in weights]
        opt, opt_ref = (uf.AdamP(ps, lr=0.05, delta=2.0, weight_decay=0.1, backend=b)
                        for ps, b in ((ours, backend), (ref, "torch")))
        for _ in range(2):
            grads = [torch.randn(w.shape, generator=gen) for w in weights]
            set_grads(ours, grads)
            set_grads(ref, grads)
            if refused:
                before = [p.detach().clone() for p in ours]
                with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*dim 0 is not outermost"):
                    opt.step()
                assert all(torch.equal(p, b) for p, b in zip(ours, before)) and not opt.state
                break
            opt.step()
            opt_ref.step()
            for p, q in zip(ours, ref):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# The reference packages of rules torch lacks, where they import (none is pinned: timm needs torchvision, and
# torch-optimizer pins nothing newer than 2021; here timm 1.0.31 and torch-optimizer 0.3.0 were loaded from their
# files, and gave at most 1.7e-7 relative after 20 steps on every backend): (module, class, ours, settings by id).
PACKAGE_TWINS = [
    ("timm.optim.lars", "Lars", uf.LARS, {
        "wd": dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coeff=0.02),
        "nesterov-larc": dict(lr=0.3, momentum=0.8, nesterov=True, always_adapt=True, trust_clip=True,
                              trust_coeff=0.01),
        "plain": dict(lr=0.2, weight_decay=0.05, trust_clip=True)}),
    # (timm's default max_grad_norm=1.0 clips the harness's gradients)
    ("timm.optim.lamb", "Lamb", uf.LAMB, {
        "wd-clipped": dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1),
        "lambc-no-averaging": dict(lr=1e-2, weight_decay=0.0, always_adapt=True, trust_clip=True,
                                   grad_averaging=False, max_grad_norm=0.5),
        "plain-uncorrected": dict(lr=1e-2, bias_correction=False, weight_decay=0.0, max_grad_norm=None)}),
    ("torch_optimizer.diffgrad", "DiffGrad", uf.DiffGrad, {
        "decay": dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
        "defaults": dict(lr=1e-2)}),
    # (delta 1.5 projects the harness's random gradients, per row or whole; 0.1, the default, rarely does: the
    # per-row edge test runs it)
    ("adamp", "AdamP", uf.AdamP, {
        "nesterov": dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, delta=1.5, wd_ratio=0.3,
                         nesterov=True)}),
    ("adamp", "SGDP", uf.SGDP, {
        "momentum": dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1, delta=1.5, wd_ratio=0.3),
        "nesterov": dict(lr=1e-2, momentum=0.8, nesterov=True, weight_decay=0.1, delta=1.5)}),
    ("sgd_sai", "SGD_sai", uf.SGDSaI, {
        "decay": dict(lr=5e-2, momentum=0.8, eps=1e-3, weight_decay=0.1),
        "defaults": dict()}),
]


# Every setting on every backend, but Triton's interpreter (4-8 s a run) takes each package's first: the kernels meet the
# float64 oracle on every harness case besides.
@pytest.mark.parametrize("module, name, ours, hyper, backend", [
    pytest.param(module, name, ours, hyper, backend, id=f"{name}-{key}-{backend}")
    for module, name, ours, settings in PACKAGE_TWINS for n, (key, hyper) in enumerate(settings.items())
    for backend in ALL_BACKENDS if backend != "triton" or n == 0])
def test_matches_the_reference_package_where_installed(module, name, ours, hyper, backend):
    theirs = getattr(pytest.importorskip(module), name)
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    a, b = make_params(), make_params()
    if module == "adamp":  # its rows are views, which a permuted parameter has none of
        a, b = ([p.detach().contiguous().requires_grad_() for p in ps] for ps in (a, b))
    opt_a, opt_b = ours(a, backend=backend, **hyper), theirs(b, **hyper)
    gen = torch.Generator().manual_seed(23)
    for _ in range(10):
        grads = random_grads(a, gen)
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
    for i, (p, q) in enumerate(zip(a, b)):
        assert_scaled_close(p, f64(q), 1e-6, f"param {i}")


def test_lars_refuses_dtensor_parameters_beside_plain_ones_before_any_change():
    """Each tensor's norms are summed over the ranks that shard it: a plain parameter beside a DTensor one has no
    mesh, and the step raises, naming them, with nothing updated."""
    from torch.distributed.tensor import DTensor, Shard
    with one_rank_mesh() as mesh:
        gen = torch.Generator().manual_seed(22)
        plain = torch.randn(6, generator=gen).requires_grad_()
        placed = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 3, generator=gen), mesh, [Shard(0)]))
        opt = uf.LARS([plain, placed], lr=0.1, momentum=0.9, weight_decay=0.01, backend="torch")
        plain.grad = torch.randn(6, generator=gen)
        placed.grad = DTensor.from_local(torch.randn(4, 3, generator=gen), mesh, [Shard(0)])
        before = [plain.detach().clone(), placed.full_tensor().clone()]
        with pytest.raises(ValueError, match=r"every parameter to be a DTensor: parameters \[0\] \(in the optimizer's "
                                             r"order\) are not"):
            opt.step()
        assert torch.equal(plain, before[0]) and torch.equal(placed.full_tensor(), before[1]) and not opt.state


def test_adamp_refuses_parameters_sharded_across_their_rows_before_any_change():
    """AdamP sums each row on the rank that holds it: a parameter sharded on dim 1 (tensor parallelism's column split)
    has rows across ranks, and the step raises, naming the placements, with nothing updated."""
    from torch.distributed.tensor import DTensor, Shard
    with one_rank_mesh() as mesh:
        gen = torch.Generator().manual_seed(26)
        placed = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 3, generator=gen), mesh, [Shard(1)]))
        opt = uf.AdamP([placed], lr=0.1, delta=2.0, backend="torch")
        placed.grad = DTensor.from_local(torch.randn(4, 3, generator=gen), mesh, [Shard(1)])
        before = placed.full_tensor().clone()
        with pytest.raises(ValueError, match=r"sharded by rows only .*Shard\(dim=1\)"):
            opt.step()
        assert torch.equal(placed.full_tensor(), before) and not opt.state


def test_clipping_adds_the_shares_of_groups_on_different_backends():
    # One norm over both groups: the pre-pass sums of backend "torch" and of a kernel backend are added.
    backend = next((b for b in ("cuda", "triton") if uf.backends.availability("cpu")[b] is None), None)
    if backend is None:
        pytest.skip("no kernel backend runs on CPU tensors here")
    a, b = make_params(), make_params()
    opt_a = uf.SGD([{"params": a[:3], "backend": "torch"}, {"params": a[3:], "backend": backend}], lr=0.1,
                   momentum=0.9, max_grad_norm=0.4)
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = random_grads(a, gen)
        set_grads(a, grads)
        set_grads(b, grads)
        assert float(torch.nn.utils.clip_grad_norm_(b, 0.4)) > 0.4
        opt_a.step()
        opt_b.step()
    assert opt_a.backends == ["torch", backend]
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_auto_takes_the_cpu_backend_for_cpu_parameters():
    assert uf.AdamW(make_params()).backends == ["cpu"]
    with pytest.raises(uf.BackendUnavailableError, match="backend 'cpu' updates CPU parameters, got meta"):
        uf.AdamW([torch.zeros(3, device="meta", requires_grad=True)], backend="cpu")


TORCH_TWINS = [
    ("adamw", lambda ps, **kw: uf.AdamW(ps, lr=2e-2, betas=(0.85, 0.98), eps=1e-6, weight_decay=0.05, **kw),
     lambda ps: torch.optim.AdamW(ps, lr=2e-2, betas=(0.85, 0.98), eps=1e-6, weight_decay=0.05, foreach=False)),
    ("sgd-momentum", lambda ps, **kw: uf.SGD(ps, lr=2e-2, momentum=0.9, dampening=0.3, weight_decay=0.01, **kw),
     lambda ps: torch.optim.SGD(ps, lr=2e-2, momentum=0.9, dampening=0.3, weight_decay=0.01, foreach=False)),
    ("sgd-nesterov", lambda ps, **kw: uf.SGD(ps, lr=2e-2, momentum=0.9, nesterov=True, **kw),
     lambda ps: torch.optim.SGD(ps, lr=2e-2, momentum=0.9, nesterov=True, foreach=False)),
    ("sgd-plain", lambda ps, **kw: uf.SGD(ps, lr=2e-2, momentum=0.0, weight_decay=0.1, **kw),
     lambda ps: torch.optim.SGD(ps, lr=2e-2, momentum=0.0, weight_decay=0.1, foreach=False)),
    ("adagrad", lambda ps, **kw: uf.Adagrad(ps, lr=5e-2, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1,
                                            eps=1e-6, **kw),
     lambda ps: torch.optim.Adagrad(ps, lr=5e-2, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1,
                                    eps=1e-6, foreach=False)),
]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_adagrad_resumes_a_torch_optim_adagrad_state_dict(backend):
    """Drop-in both ways: uf.Adagrad continues a torch.optim.Adagrad run from its state dict (step counts, which
    lr_decay reads, and the sums), and torch.optim.Adagrad loads ours."""
    kw = dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3, eps=1e-3)
    a, b = make_params(), make_params()
    theirs = torch.optim.Adagrad(a, **kw, foreach=False)
    gen = torch.Generator().manual_seed(9)
    for t in range(6):
        grads = random_grads(a, gen)
        if t == 3:
            with torch.no_grad():
                for p, q in zip(a, b):
                    q.copy_(p)
            ours = uf.Adagrad(b, **kw, backend=backend)
            ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # torch's state dict holds its live tensors
        set_grads(a, grads)
        theirs.step()
        if t >= 3:
            set_grads(b, grads)
            ours.step()
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")
        assert int(ours.state[q]["step"]) == int(theirs.state[p]["step"]) == 6
    torch.optim.Adagrad(make_params(), **kw).load_state_dict(ours.state_dict())


def _run_twins(ours, theirs, steps=25, torch_sched=None):
    a, b = make_params(), make_params()
    opt_a, opt_b = ours(a), theirs(b)
    sched = torch_sched(opt_b) if torch_sched else None
    gen = torch.Generator().manual_seed(5)
    for t in range(steps):
        grads = random_grads(a, gen, skip=(t % 7) if t % 2 else None)
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
        if sched:
            sched.step()
    return a, b, opt_a, opt_b


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name,ours,theirs", TORCH_TWINS, ids=[t[0] for t in TORCH_TWINS])
def test_matches_torch_optim(name, ours, theirs, backend):
    # Same fp32 formulas in a different operation order (torch lerps the first moment): a few ulps apart.
    a, b, opt_a, opt_b = _run_twins(lambda ps: ours(ps, backend=backend), theirs)
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")
        for k, v in opt_b.state.get(q, {}).items():
            torch.testing.assert_close(opt_a.state[p][k].float(), v.float(), rtol=1e-5, atol=1e-7,
                                       msg=lambda m, i=i, k=k: f"param {i} state {k}: {m}")


@pytest.mark.parametrize("name,ours,theirs", TORCH_TWINS, ids=[t[0] for t in TORCH_TWINS])
def test_cpu_backend_with_gradients_laid_out_as_their_parameters_or_not(name, ours, theirs, monkeypatch):
    # Where every gradient is laid out as its parameter, one C++ pass vouches for them all and no Python check
    # visits them (the common step); a permuted parameter's contiguous gradient takes the checked path, and
    # torch's fused kernels walk a copy laid out as the parameter. Steps alternate between the two.
    checked = []
    monkeypatch.setattr(uf.backends.work, "check_grads", lambda *a, _f=uf.backends.work.check_grads: (
        checked.append(1), _f(*a)))
    a, b = make_params(), make_params()
    opt_a, opt_b = ours(a, backend="cpu"), theirs(b)
    gen = torch.Generator().manual_seed(8)
    for t in range(8):
        grads = random_grads(a, gen)
        if t % 2:
            grads = [torch.empty_like(p).copy_(g) for p, g in zip(a, grads)]  # each laid out as its parameter
        set_grads(a, grads)
        set_grads(b, grads)
        checked.clear()
        opt_a.step()
        opt_b.step()
        assert bool(checked) == (not t % 2 or uf._ext._C is None), f"step {t}"
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES.values() if s is not None],
                         ids=[k for k, s in SCHEDULES.items() if s is not None])
@pytest.mark.parametrize("name,ours,theirs", TORCH_TWINS[:2], ids=[t[0] for t in TORCH_TWINS[:2]])
def test_device_schedule_matches_torch_with_host_scheduler(name, ours, theirs, schedule):
    a, b, opt_a, _ = _run_twins(lambda ps: ours(ps, schedule=schedule), theirs, steps=16,
                                torch_sched=lambda o: uf.LRScheduler(o, schedule))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert float(opt_a.get_last_lr()[0]) == pytest.approx(2e-2 * schedule.factor(15), rel=1e-6)


def test_tensor_lr_equals_float_lr():
    a, b = make_params(), make_params()
    opt_a = uf.AdamW(a, lr=torch.tensor(0.01, dtype=torch.float64), schedule=SCHEDULES["uba"])
    opt_b = uf.AdamW(b, lr=0.01, schedule=SCHEDULES["uba"])
    step_together([(a, opt_a), (b, opt_b)], torch.Generator().manual_seed(1), 5)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_groups_have_their_own_hyperparameters_and_schedules():
    ps = make_params()
    opt = uf.AdamW([{"params": ps[:3], "lr": 0.1, "schedule": uf.Linear(4)},
                    {"params": ps[3:], "weight_decay": 0.0}], lr=0.01, schedule=uf.Cosine(10))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        set_grads(ps, random_grads(ps, gen))
        opt.step()
    lr0, lr1 = (float(x) for x in opt.get_last_lr())
    assert lr0 == pytest.approx(0.1 * uf.Linear(4).factor(2), rel=1e-6)
    assert lr1 == pytest.approx(0.01 * uf.Cosine(10).factor(2), rel=1e-6)
    assert [int(g["schedule_step"]) for g in opt.param_groups] == [3, 3]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_step_without_any_gradient_advances_the_schedule_and_nothing_else(backend):
    """The schedule's t counts step() calls, with or without gradients (as a torch LR scheduler counts its own
    step() calls): such a step moves no parameter, state or step count, and applies (and reports) lr(t)."""
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    ps = make_params()
    opt = uf.Lion(ps, schedule=uf.Linear(10), backend=backend)
    opt.step()
    assert int(opt.param_groups[0]["schedule_step"]) == 1
    assert len(opt.state) == 0  # torch semantics: no grad, no state
    gen = torch.Generator().manual_seed(0)
    set_grads(ps, random_grads(ps, gen))
    opt.step()
    assert float(opt.get_last_lr()[0]) == pytest.approx(1e-4 * 0.9, rel=1e-6)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ps]
    for p in ps:
        p.grad = None
    opt.step()
    assert int(opt.param_groups[0]["schedule_step"]) == 3
    assert float(opt.get_last_lr()[0]) == pytest.approx(1e-4 * 0.8, rel=1e-6)
    for p, (p0, s0) in zip(ps, before):
        assert torch.equal(p, p0) and all(torch.equal(opt.state[p][k], v) for k, v in s0.items())
    set_grads(ps, random_grads(ps, gen))
    opt.step()
    assert float(opt.get_last_lr()[0]) == pytest.approx(1e-4 * 0.7, rel=1e-6)
    assert all(int(opt.state[p]["step"]) == 2 for p in ps)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_one_element_tensor_lr_of_any_shape_is_taken_as_torch_optim_takes_it(backend):
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    a, b = make_params(), make_params()
    opt_a = uf.AdamW(a, lr=torch.tensor([[0.01]], dtype=torch.float64), schedule=SCHEDULES["uba"], backend=backend)
    opt_b = uf.AdamW(b, lr=torch.tensor(0.01, dtype=torch.float64), schedule=SCHEDULES["uba"], backend=backend)
    assert float(opt_a.get_last_lr()[0]) == pytest.approx(0.01)
    step_together([(a, opt_a), (b, opt_b)], torch.Generator().manual_seed(1), 3)
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["lr"].fill_(0.02)
    step_together([(a, opt_a), (b, opt_b)], torch.Generator().manual_seed(2), 2)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert float(opt_a.get_last_lr()[0]) == pytest.approx(0.02 * SCHEDULES["uba"].factor(4), rel=1e-6)


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))
    opt = uf.SGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    torch.testing.assert_close(loss, (before**2).sum())
    torch.testing.assert_close(p.detach(), before - 0.1 * 2 * before)


def _named(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [("encoder.weight", torch.nn.Parameter(torch.randn(4, 3, generator=gen))),
            ("encoder.bias", torch.nn.Parameter(torch.randn(4, generator=gen)))]


@pytest.mark.parametrize("ours,theirs", [
    (uf.AdamW, torch.optim.AdamW),
    (lambda ps, **kw: uf.SGD(ps, lr=0.1, momentum=0.9, **kw), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
], ids=["adamw", "sgd"])
def test_named_parameters_are_taken_as_torch_optim_takes_them(ours, theirs):
    a, b = _named(), _named()
    opt_a, opt_b = ours(a), theirs(b)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for (_, p), (_, q) in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for (_, p), (_, q) in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt_a.state_dict()["param_groups"][0]["param_names"] == ["encoder.weight", "encoder.bias"]
    assert opt_a.state_dict()["param_groups"][0]["param_names"] == opt_b.state_dict()["param_groups"][0]["param_names"]


def test_torch_signatures_and_implementation_flags_are_accepted():
    """torch.optim's positional order, and foreach / capturable / fused=True, which change nothing here."""
    make = lambda: make_params(seed=2)  # noqa: E731
    a, b, c, d = make(), make(), make(), make()
    runs = [(a, uf.AdamW(a, 1e-2, (0.8, 0.9), 1e-6, 0.1, False, foreach=True, capturable=True, fused=True)),
            (b, torch.optim.AdamW(b, 1e-2, (0.8, 0.9), 1e-6, 0.1, False, foreach=False)),
            (c, uf.SGD(c, 1e-2, 0.9, 0.1, 1e-3, False, foreach=False, capturable=False, fused=None)),
            (d, torch.optim.SGD(d, 1e-2, 0.9, 0.1, 1e-3, False, foreach=False))]
    step_together(runs, torch.Generator().manual_seed(3), 5)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    for p, q in zip(c, d):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert uf.SGD(make()).defaults["momentum"] == torch.optim.SGD(make()).defaults["momentum"] == 0


@pytest.mark.parametrize("no_prox", [False, True])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_adan_matches_timm_where_installed(backend, no_prox):
    # timm's Adan is a port of the reference (sail-sg/Adan); it counts steps per group, so every parameter
    # gets a gradient at every step here. timm is not a test requirement: this runs where it is installed.
    timm_optim = pytest.importorskip("timm.optim")
    kw = dict(lr=1e-2, betas=(0.9, 0.85, 0.95), eps=1e-6, weight_decay=0.05, no_prox=no_prox)
    a, b = make_params(), make_params()
    opt_a, opt_b = uf.Adan(a, **kw, backend=backend), timm_optim.Adan(b, **kw)
    step_together([(a, opt_a), (b, opt_b)], torch.Generator().manual_seed(3), 12)
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sgd_sai_measures_each_tensor_at_its_first_step_and_only_while_one_has_not(backend, monkeypatch):
    """Each tensor's g-SNR is that of its first gradient, also for a parameter whose first gradient comes later, and
    stays; the pre-pass that measures runs on the steps where some tensor takes its first step, and on no other (the
    poll of the step counts clears it: snr.unmeasured)."""
    reason = uf.backends.availability("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    calls = []
    moments = uf.backends.snr.moments
    monkeypatch.setattr(uf.backends.snr, "moments", lambda grads, device: calls.append(1) or moments(grads, device))
    gen = torch.Generator().manual_seed(31)
    params = [torch.randn(shape, generator=gen).requires_grad_() for shape in ((5, 7), (1,), (300,))]
    opt = uf.SGDSaI(params, lr=0.1, momentum=0.5, eps=1e-3, backend=backend)
    expected = {}
    for t in range(5):
        grads = [torch.randn(p.shape, generator=gen) * 0.01 * (t + 1) for p in params]
        if t < 2:
            grads[2] = None  # its first gradient at step 2
        set_grads(params, grads)
        for i, g in enumerate(grads):
            if g is not None and i not in expected:
                x = f64(g).ravel()
                std = x.std(ddof=1) if x.size > 1 else 0.0
                expected[i] = math.sqrt((x * x).sum()) / (std + 1e-3)
        opt.step()
        assert len(calls) == [1, 1, 2, 2, 2][t], f"step {t}: the pre-pass measured {len(calls)} times so far"
        for i, gsnr in expected.items():
            assert float(opt.state[params[i]]["gsnr"]) == pytest.approx(gsnr, rel=1e-6), f"step {t}: param {i}"


def test_sgd_sai_loads_the_packages_state_dict_and_goes_on_as_it():
    """The sgd-sai package keeps a momentum buffer and a g-SNR per parameter, and no step count: loaded, they are
    this optimizer's state (a buffer counts as one step taken), and the next steps equal the package's."""
    theirs_cls = pytest.importorskip("sgd_sai").SGD_sai
    hyper = dict(lr=5e-2, momentum=0.8, eps=1e-3, weight_decay=0.1)
    a, b = make_params(), make_params()
    theirs = theirs_cls(a, **hyper)
    gen = torch.Generator().manual_seed(32)
    for _ in range(3):
        set_grads(a, random_grads(a, gen))
        theirs.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    ours = uf.SGDSaI(b, **hyper, backend="cpu")
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert all(float(ours.state[q]["step"]) == 1.0 and ours.state[q]["gsnr"].dtype == torch.float32 for q in b)
    for _ in range(3):
        grads = random_grads(a, gen)
        set_grads(a, grads)
        set_grads(b, grads)
        theirs.step()
        ours.step()
    for i, (p, q) in enumerate(zip(a, b)):
        assert_scaled_close(q, f64(p), 1e-6, f"param {i}")


def test_sgd_sai_refuses_a_saved_state_without_its_gsnr_before_any_change():
    """A saved state without the g-SNR (or with one of several values) cannot go on as SGD-SaI: the load raises naming
    it, and the optimizer keeps its state."""
    params = make_params()
    opt = uf.SGDSaI(params, lr=0.1, backend="torch")
    set_grads(params, random_grads(params, torch.Generator().manual_seed(33)))
    opt.step()
    kept = {k: v.clone() for k, v in opt.state[params[0]].items()}
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["gsnr"]
    with pytest.raises(ValueError, match=r"state\[0\] lacks 'gsnr', which uba_fused.SGDSaI needs"):
        opt.load_state_dict(sd)
    sd["state"][0]["gsnr"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"state\[0\]\['gsnr'\] must be a one-element floating-point tensor"):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in kept.items())
