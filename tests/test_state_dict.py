import copy
import io

import pytest
import torch

import uba_fused as uf

from harness import CASE_IDS, CASES, make_params, random_grads, set_grads


def _train(opt, params, gen, steps):
    for _ in range(steps):
        set_grads(params, random_grads(params, gen))
        opt.step()


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # schedules are stored as plain dicts


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_round_trip_mid_schedule_continues_identically(case):
    schedule = uf.UBA(20, phi=0.6, warmup_steps=3, min_lr_ratio=0.1)
    a = make_params()
    opt_a = case.make(a, schedule=schedule)
    gen = torch.Generator().manual_seed(7)
    _train(opt_a, a, gen, 6)

    sd = _save_load(opt_a.state_dict())
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = case.make(b, schedule=uf.Constant())  # the saved schedule wins
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["schedule"] == schedule
    assert int(opt_b.param_groups[0]["schedule_step"]) == 6

    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    _train(opt_a, a, gen_a, 8)
    _train(opt_b, b, gen_b, 8)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in opt_a.state.get(p, {}).items():
            assert torch.equal(v, opt_b.state[q][k]), k
    assert torch.equal(opt_a.get_last_lr()[0], opt_b.get_last_lr()[0])


@pytest.mark.parametrize("twin", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), lambda ps: uf.AdamW(ps, lr=5.0), 5),
    # torch.optim.SGD keeps no step count; a loaded momentum buffer counts as one step taken.
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1), lambda ps: uf.SGD(ps, lr=5.0), 1),
], ids=["adamw", "sgd"])
def test_loads_torch_optim_state_dict_and_continues_like_torch(twin):
    make_torch, make_ours, loaded_step = twin
    a = make_params()
    torch_opt = make_torch(a)
    gen = torch.Generator().manual_seed(1)
    _train(torch_opt, a, gen, 5)

    b = [p.detach().clone().requires_grad_() for p in a]
    ours = make_ours(b)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert ours.param_groups[0]["lr"] == 1e-2  # torch's hyper-parameters are taken
    assert ours.param_groups[0]["schedule"] is None
    for q in b:
        if ours.state.get(q):
            assert ours.state[q]["step"].dtype == torch.float32 and int(ours.state[q]["step"]) == loaded_step

    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    _train(torch_opt, a, gen_a, 6)
    _train(ours, b, gen_b, 6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def _bf16_params():
    return [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params()]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float32_state_of_bf16_parameters_survives_a_round_trip_unrounded(backend):
    # torch.optim's load casts every state buffer to its parameter's dtype; state_dtype=float32 must undo that
    # from the saved values, not from the bf16 copies.
    a = _bf16_params()
    opt_a = uf.AdamW(a, lr=1e-2, state_dtype=torch.float32, backend=backend)
    _train(opt_a, a, torch.Generator().manual_seed(1), 4)
    sd = _save_load(opt_a.state_dict())
    exp_avg = [opt_a.state[p]["exp_avg"] for p in a if p.numel()]
    assert all(m.dtype == torch.float32 and not torch.equal(m, m.bfloat16().float()) for m in exp_avg)

    b = _bf16_params()
    opt_b = uf.AdamW(b, lr=1e-2, backend=backend)  # state_dtype comes from the state dict, as the lr does
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["state_dtype"] == torch.float32
    for p, q in zip(a, b):
        for k, v in opt_a.state[p].items():
            assert opt_b.state[q][k].dtype == v.dtype and torch.equal(opt_b.state[q][k], v), k
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    _train(opt_a, a, gen_a, 3)
    _train(opt_b, b, gen_b, 3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)

    sd["param_groups"][0]["state_dtype"] = None  # the parameters' dtype: the loaded state is rounded to bf16
    opt_c = uf.AdamW(_bf16_params(), lr=1e-2, backend=backend)
    opt_c.load_state_dict(sd)
    for q in opt_c.state.values():
        assert q["exp_avg"].dtype == torch.bfloat16 and q["step"].dtype == torch.float32


def test_state_dtype_is_saved_by_name_which_torch_distributed_state_dicts_walk():
    """A torch.dtype in a saved group made FSDP2's full state dict (torch.distributed's _iterate_state_dict) raise
    "Unexpected value type <class 'torch.dtype'>": state_dict() writes its name, and a load reads it back."""
    p = torch.randn(64, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    opt = uf.AdamW([p], lr=1e-2, state_dtype=torch.int8, schedule=uf.UBA(10))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "int8"
    plain = (int, float, bool, str, type(None), torch.Tensor)  # what that walker takes, besides dicts and lists
    leaves = [v for g in sd["param_groups"] for v in g.values() if not isinstance(v, (dict, list, tuple))]
    leaves += [v for g in sd["param_groups"] for v in g["schedule"].values()]
    assert all(isinstance(v, plain) for v in leaves), [type(v) for v in leaves]
    again = uf.AdamW([p], lr=1e-2)
    again.load_state_dict(sd)
    assert again.param_groups[0]["state_dtype"] == torch.int8
    sd["param_groups"][0]["state_dtype"] = "int9"
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['state_dtype'\] must name a torch dtype"):
        again.load_state_dict(sd)


def test_torch_optim_state_dict_of_bf16_parameters_loads_into_float32_state():
    a = _bf16_params()
    torch_opt = torch.optim.AdamW(a, lr=1e-2)
    _train(torch_opt, a, torch.Generator().manual_seed(1), 3)
    ours = uf.AdamW(_bf16_params(), state_dtype=torch.float32)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # a torch.optim group has no state_dtype: ours
    assert ours.param_groups[0]["state_dtype"] == torch.float32
    for p, q in zip(a, ours.param_groups[0]["params"]):
        for k in ("exp_avg", "exp_avg_sq"):
            v = ours.state[q][k]
            assert v.dtype == torch.float32 and torch.equal(v, torch_opt.state[p][k].float()), k


def test_our_adamw_state_dict_loads_into_torch_optim():
    a = make_params()
    ours = uf.AdamW(a, lr=1e-2)
    _train(ours, a, torch.Generator().manual_seed(1), 3)
    b = [p.detach().clone().requires_grad_() for p in a]
    theirs = torch.optim.AdamW(b, lr=1e-2)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # as if saved: no shared tensors
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    _train(ours, a, gen_a, 3)
    _train(theirs, b, gen_b, 3)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES[::3], ids=CASE_IDS[::3])
def test_deepcopy_gives_an_independent_optimizer_that_continues_identically(case):
    a = make_params()
    opt_a = case.make(a, schedule=uf.Cosine(12))
    _train(opt_a, a, torch.Generator().manual_seed(3), 4)
    b, opt_b = copy.deepcopy((a, opt_a))  # as torch.optim allows: params and optimizer copied together
    gen_a, gen_b = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    _train(opt_a, a, gen_a, 3)
    _train(opt_b, b, gen_b, 3)
    for p, q in zip(a, b):
        assert torch.equal(p, q) and (p.numel() == 0 or p.data_ptr() != q.data_ptr())
    assert torch.equal(opt_a.get_last_lr()[0], opt_b.get_last_lr()[0])
    assert int(opt_b.param_groups[0]["schedule_step"]) == 7


@pytest.mark.parametrize("how", ["loaded-before", "deepcopy", "pickle"])
@pytest.mark.parametrize("case", CASES[::4], ids=CASE_IDS[::4])
def test_every_load_takes_the_optimizers_own_state_dict(case, how):
    """torch.optim's __setstate__ (run by its load_state_dict, by deepcopy and by unpickling) adds 'differentiable'
    to the defaults; later loads must not ask a saved group for it (accelerate loads once in prepare(), so HF
    Trainer's resume_from_checkpoint is a second load)."""
    a = make_params()
    opt = case.make(a, schedule=uf.Cosine(12))
    _train(opt, a, torch.Generator().manual_seed(3), 4)
    if how == "loaded-before":
        opt.load_state_dict(_save_load(opt.state_dict()))
    elif how == "deepcopy":
        a, opt = copy.deepcopy((a, opt))
    else:
        buf = io.BytesIO()
        torch.save((a, opt), buf)
        buf.seek(0)
        a, opt = torch.load(buf, weights_only=False)
    sd = _save_load(opt.state_dict())
    b = [p.detach().clone().requires_grad_() for p in a]
    fresh = case.make(b, schedule=uf.Cosine(12))
    for target, params in ((opt, a), (fresh, b)):
        target.load_state_dict(sd)
        target.load_state_dict(_save_load(target.state_dict()))  # and again
    gen_a, gen_b = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    _train(opt, a, gen_a, 3)
    _train(fresh, b, gen_b, 3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert int(fresh.param_groups[0]["schedule_step"]) == 7
    # Still refused: a state dict that lacks one of the class's own hyper-parameters.
    bad = _save_load(opt.state_dict())
    del bad["param_groups"][0]["eps" if "eps" in bad["param_groups"][0] else "lr"]
    with pytest.raises(ValueError, match=r"param_groups\[0\] lacks '(eps|lr)'"):
        fresh.load_state_dict(bad)
