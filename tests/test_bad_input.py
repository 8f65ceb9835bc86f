"""Every bad input raises a clear error before anything is modified."""

import copy
import math

import pytest
import torch

import uba_fused as uf

from harness import make_params, random_grads, set_grads


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, params, snap):
    values, sd = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        for name, v in st.items():
            assert torch.equal(now["state"][k][name], v), (k, name)
    for g_now, g_then in zip(now["param_groups"], sd["param_groups"]):
        assert torch.equal(g_now["schedule_step"], g_then["schedule_step"])


def _trained(cls=uf.AdamW, **kw):
    params = make_params()
    opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        set_grads(params, random_grads(params, gen))
        opt.step()
    set_grads(params, random_grads(params, gen))
    return opt, params


@pytest.mark.parametrize("cls,kwargs,match", [
    (uf.AdamW, dict(lr=-1e-3), "lr must be finite and in"),
    (uf.AdamW, dict(lr=math.nan), "lr"),
    (uf.AdamW, dict(lr=math.inf), "lr"),
    (uf.AdamW, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (uf.AdamW, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (uf.AdamW, dict(betas=(0.9,)), "betas must be a tuple of 2"),
    (uf.AdamW, dict(eps=-1e-8), "eps"),
    (uf.AdamW, dict(weight_decay=math.nan), "weight_decay"),
    (uf.AdaBelief, dict(eps=math.inf), "eps"),
    (uf.AdaBelief, dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (uf.Lion, dict(lr=-1.0), "lr"),
    (uf.Lion, dict(weight_decay=-0.1), "weight_decay"),
    (uf.SGD, dict(momentum=-0.5), "momentum"),
    (uf.SGD, dict(dampening=2.0), "dampening"),
    (uf.SGD, dict(nesterov=True, dampening=0.1), "nesterov=True needs"),
    (uf.SGD, dict(nesterov=True, momentum=0.0), "nesterov=True needs"),
    (uf.Adagrad, dict(initial_accumulator_value=-0.1), "initial_accumulator_value must be finite and in"),
    (uf.Adagrad, dict(lr_decay=math.inf), "lr_decay"),
    (uf.LARS, dict(trust_coeff=-0.001), "trust_coeff must be finite and in"),
    (uf.LARS, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov=True needs"),
    (uf.LARS, dict(master_weights="exact"), "master_weights='exact' is not built for uba_fused.LARS"),
    (uf.DiffGrad, dict(betas=(-0.1, 0.9)), r"betas\[0\]"),
    (uf.DiffGrad, dict(weight_decay=-1.0), "weight_decay must be finite and in"),
    (uf.LAMB, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (uf.LAMB, dict(eps=-1e-6), "eps must be finite and in"),
    (uf.LAMB, dict(max_grad_norm=-1.0), "max_grad_norm must be finite and in"),
    (uf.AdamP, dict(delta=-0.1), "delta must be finite and in"),
    (uf.AdamP, dict(wd_ratio=math.nan), "wd_ratio must be finite and in"),
    (uf.SGDP, dict(momentum=1.0), r"momentum must be finite and in \[0.0, 1.0\), got 1.0"),
    (uf.SGDP, dict(eps=-1e-8), "eps must be finite and in"),
    (uf.SGDSaI, dict(momentum=1.0), r"momentum must be finite and in \[0.0, 1.0\), got 1.0"),
    (uf.SGDSaI, dict(eps=-1e-8), "eps must be finite and in"),
    (uf.SGDSaI, dict(lr=-0.1), "lr must be finite and in"),
    (uf.AdamW, dict(backend="cudnn"), "backend must be one of"),
    (uf.Adan, dict(max_grad_norm=-1.0), "max_grad_norm must be finite and in"),
    (uf.Adan, dict(max_grad_norm=math.inf), "max_grad_norm must be finite and in"),
    (uf.AdamW, dict(lr=torch.ones(2)), "lr as a tensor must be"),
])
def test_bad_hyperparameters_raise_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(make_params(), **kwargs)


@pytest.mark.parametrize("cls,state_dtype,params,error,match", [
    (uf.Lion, torch.float16, None, ValueError, "state_dtype=torch.float16 is not supported"),
    (uf.SGD, torch.float64, None, ValueError,
     "state_dtype must be None .*, torch.float32, torch.bfloat16 or torch.int8 .8-bit., got torch.float64"),
    (uf.Adan, "float32", None, TypeError, "state_dtype must be None or a torch.dtype .*got str 'float32'"),
    (uf.AdaBelief, torch.float32, [torch.zeros(3), torch.zeros(2, dtype=torch.float64)], ValueError,
     r"would keep the state of the float64 parameters \[1\] of this group in less precision"),
])
def test_bad_state_dtype_raises_at_construction(cls, state_dtype, params, error, match):
    with pytest.raises(error, match=match):
        cls(make_params() if params is None else params, state_dtype=state_dtype)


@pytest.mark.parametrize("kwargs", [dict(schedule="cosine"), dict(lr="0.1"), dict(nesterov=1)])
def test_wrong_types_raise(kwargs):
    with pytest.raises(TypeError):
        uf.SGD(make_params(), **kwargs)


@pytest.mark.parametrize("cls,kwargs,error,match", [
    (uf.AdamW, dict(betas=0.9), ValueError, "betas must be a tuple of 2 numbers, got 0.9"),
    (uf.Lion, dict(betas=[0.9]), ValueError, r"betas must be a tuple of 2 numbers, got \(0.9,\)"),
    (uf.AdamW, dict(amsgrad=True), ValueError, "amsgrad=True is not implemented"),
    (uf.SGD, dict(maximize=True), ValueError, "maximize=True is not supported: minimize the negated objective"),
    (uf.Lion, dict(differentiable=True), ValueError, "differentiable=True is not supported: the update runs in place"),
    (uf.AdaBelief, dict(fused=False), ValueError, "fused=False asks for an unfused step; .*backend='torch'"),
    (uf.AdamW, dict(foreach="yes"), TypeError, "foreach must be a bool, got str"),
    (uf.SGD, dict(capturable=1), TypeError, "capturable must be a bool"),
    (uf.LAMB, dict(trust_clip=1), TypeError, "trust_clip must be a bool, got 1"),
    (uf.LAMB, dict(bias_correction="no"), TypeError, "bias_correction must be a bool"),
    (uf.AdamP, dict(nesterov=1), TypeError, "nesterov must be a bool, got 1"),
])
def test_torch_flags_are_taken_or_refused_with_the_reason(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(make_params(), **kwargs)


def test_params_as_a_set_or_half_named_are_refused():
    ps = make_params()
    for params in (set(ps), [{"params": set(ps)}]):
        with pytest.raises(TypeError, match="not a set"):
            uf.AdamW(params)
    with pytest.raises(ValueError, match=r"all tensors or all \(name, tensor\) pairs.*params\[1\] is a Tensor"):
        uf.AdamW([("a", ps[0]), ps[1]])
    with pytest.raises(ValueError, match=r"params\[1\] \('b'\) is complex"):
        uf.AdamW([("a", ps[0]), ("b", torch.zeros(2, dtype=torch.complex64))])


def test_complex_and_integer_parameters_are_refused():
    with pytest.raises(ValueError, match=r"params\[1\] is complex"):
        uf.AdamW([torch.zeros(2), torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="has dtype torch.int64"):
        uf.AdamW([torch.zeros(2, dtype=torch.int64)])


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("UBA_FUSED_CUDA_ON_CPU", raising=False)  # conftest sets it without a GPU
    with pytest.raises(uf.BackendUnavailableError, match="backend='cuda' is unavailable for parameters on cpu: "):
        uf.AdamW(make_params(), backend="cuda")


def test_sparse_gradient_raises_before_any_change():
    opt, params = _trained()
    snap = _snapshot(opt, params)
    params[-1].grad = torch.sparse_coo_tensor([[0, 5]], [1.0, 2.0], params[-1].shape, check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    _assert_unchanged(opt, params, snap)


def test_sparse_gradient_raises_before_lazy_state_is_created():
    params = make_params()
    opt = uf.Lion(params)
    set_grads(params, random_grads(params, torch.Generator().manual_seed(0)))
    params[4].grad = params[4].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    assert len(opt.state) == 0
    assert int(opt.param_groups[0]["schedule_step"]) == 0


@pytest.mark.parametrize("key,value,match", [("lr", -0.5, "lr"), ("betas", (0.9, 1.0), "betas"),
                                             ("schedule", "uba", "schedule must be None")])
def test_hyperparameter_broken_after_construction_raises_at_step(key, value, match):
    opt, params = _trained(schedule=uf.UBA(10))
    snap = _snapshot(opt, params)
    opt.param_groups[0][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    opt.param_groups[0][key] = snap[1]["param_groups"][0][key] if key != "schedule" else uf.UBA(10)
    _assert_unchanged(opt, params, snap)


def _break(sd, how):
    sd = copy.deepcopy(sd)
    if how == "shape":
        sd["state"][3]["exp_avg"] = torch.zeros(3, 3)
    elif how == "step":
        sd["state"][3]["step"] = torch.tensor(-1.0)
    elif how == "groups":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    elif how == "params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif how == "amsgrad":
        sd["param_groups"][0]["amsgrad"] = True
    elif how == "lr":
        sd["param_groups"][0]["lr"] = -3.0
    elif how == "schedule":
        sd["param_groups"][0]["schedule"] = {"name": "UBA", "total_steps": 10, "phi": 0.0}
    elif how == "schedule_step":
        sd["param_groups"][0]["schedule_step"] = torch.tensor(2.5)
    elif how == "not a dict":
        sd = [sd]
    elif how == "no params":
        del sd["param_groups"][0]["params"]
    elif how == "lacks exp_avg_sq":
        del sd["state"][3]["exp_avg_sq"]
    elif how == "lacks step":
        del sd["state"][3]["step"]
    elif how == "unknown param id":
        sd["state"][99] = copy.deepcopy(sd["state"][3])
    elif how == "schedule key":
        sd["param_groups"][0]["schedule"] = {"name": "Cosine", "total_steps": 10, "warmup": 3}
    return sd


@pytest.mark.parametrize("how,match", [
    ("shape", r"state\[3\]\['exp_avg'\] has shape \(3, 3\), its parameter has \(3, 5, 2, 3\)"),
    ("step", r"state\[3\]\['step'\] must be a finite non-negative scalar"),
    ("groups", "has 2 param groups, this optimizer has 1"),
    ("params", "has 6 parameters"),
    ("amsgrad", r"param_groups\[0\]: uba_fused.AdamW: amsgrad=True is not implemented"),
    ("lr", r"param_groups\[0\]: lr must be"),
    ("schedule", "phi must be finite and > 0"),
    ("schedule_step", "schedule_step'] must be a non-negative integer"),
    ("not a dict", r"must be a dict with 'state' \(a dict\) and 'param_groups' \(a list\)"),
    ("no params", r"param_groups\[0\] must be a dict with 'params'"),
    ("lacks exp_avg_sq", r"state\[3\] lacks 'exp_avg_sq', which uba_fused.AdamW needs"),
    ("lacks step", r"state\[3\] lacks 'step'"),
    ("unknown param id", r"entries for parameter ids \[99\], which no param group lists"),
    ("schedule key", r"param_groups\[0\]\['schedule'\]: .*unknown key\(s\) \['warmup'\]"),
])
def test_bad_state_dict_raises_and_changes_nothing(how, match):
    opt, params = _trained(schedule=uf.Cosine(10))
    good = opt.state_dict()
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_break(good, how))
    _assert_unchanged(opt, params, snap)


def _trained_state_dict(make, steps=2):
    params = make_params()
    opt = make(params)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        set_grads(params, random_grads(params, gen))
        opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("source,target,match", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), uf.AdamW, r"lacks 'betas', 'eps', which uba_fused.AdamW"),
    (lambda ps: uf.SGD(ps, lr=0.1, momentum=0.9), uf.AdamW, r"lacks 'betas', 'eps'"),
    (lambda ps: uf.Lion(ps), uf.AdamW, r"lacks 'eps', which uba_fused.AdamW needs"),
    (lambda ps: uf.AdamW(ps), uf.Lion, r"holds 'exp_avg_sq', which uba_fused.Lion does not keep"),
    (lambda ps: uf.AdaBelief(ps), uf.AdamW, r"holds 'exp_avg_var', which uba_fused.AdamW does not keep"),
    (lambda ps: uf.AdamW(ps), uf.AdaBelief, r"holds 'exp_avg_sq', which uba_fused.AdaBelief does not keep"),
    (lambda ps: uf.AdamW(ps), uf.SGD, r"lacks 'momentum', 'dampening', 'nesterov'"),
    (lambda ps: torch.optim.Adam(ps), uf.AdamW, r"decoupled_weight_decay=False is torch.optim.Adam's L2 decay"),
], ids=["torch-sgd>adamw", "sgd>adamw", "lion>adamw", "adamw>lion", "adabelief>adamw", "adamw>adabelief",
        "adamw>sgd", "torch-adam>adamw"])
def test_another_optimizers_state_dict_is_refused(source, target, match):
    """Loading it once ran the next step at the other optimizer's lr, with its leftover buffers."""
    sd = _trained_state_dict(source)
    opt, params = _trained(target, lr=1e-3)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, params, snap)
    assert opt.param_groups[0]["lr"] == 1e-3


_AVAIL = uf.backends.availability("cpu")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(_AVAIL[b] is not None, reason=str(_AVAIL[b])))
            for b in ("torch", "triton", "cuda")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how,match", [
    ("shape", r"param_groups\[1\]\['params'\]\[2\] has a gradient of shape \(3,\), torch.float32 on cpu, but the "
              r"parameter is \(1,\)"),
    ("dtype", r"param_groups\[1\]\['params'\]\[2\] has a gradient of shape \(1,\), torch.float64"),
    ("sparse", r"param_groups\[1\]\['params'\]\[2\] has a sparse gradient"),
])
def test_a_mismatched_gradient_raises_before_any_group_changes(backend, how, match):
    """torch's .grad setter refuses another shape or dtype, but `.grad.data = ...` does not. The torch
    backend used to update earlier parameters (and this one's step) before a broadcast error."""
    params = make_params(seed=1)
    extra = [p.detach().clone().requires_grad_() for p in make_params(seed=2)[:3]]
    opt = uf.AdamW([{"params": params}, {"params": extra, "lr": 0.1}], backend=backend, schedule=uf.UBA(10))
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # with the gradients at the same addresses: the kernel backends' steady path
        grads = random_grads(params + extra, gen)
        set_grads(params + extra, grads)
        opt.step()
    snap = _snapshot(opt, params + extra)
    bad = extra[2]  # the third parameter of the second group
    if how == "shape":
        bad.grad.data = torch.randn(3, generator=gen)
    elif how == "dtype":
        bad.grad.data = bad.grad.data.double()
    else:
        bad.grad = bad.grad.to_sparse()
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_unchanged(opt, params + extra, snap)
