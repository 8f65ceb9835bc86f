"""What users change behind the optimizer's back: a parameter given new storage (``p.data = ...``,
``model.half().float()``, ``module._apply``), a state buffer, a parameter's whole state or a group's counter
replaced. The kernel backends' device tables hold addresses; every step must notice such a change and rebuild
them, or refuse with a clear error, and never write memory the optimizer no longer owns.

Each test runs a twin on backend "torch" (which holds no address) through the same change, and compares after
every step. The stale storage is kept alive by the test, so a kernel that wrote it would leave the parameter
unchanged (a visible failure) instead of corrupting the heap. Without a GPU the kernel backends run in their CPU
test modes; on a GPU machine natively, on CUDA tensors (where the caching allocator hands a freed storage to
the next tensor of its size).
"""

import copy

import pytest
import torch

import uba_fused as uf
from uba_fused import backends

from harness import assert_same_runs, make_params as _make_params, random_grads, set_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_AVAIL = backends.availability(DEVICE)
# Backend "cpu" is for CPU parameters only: on a GPU machine these tests run on CUDA tensors without it.
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(_AVAIL[b] is not None, reason=str(_AVAIL[b])))
            for b in ("torch", "triton", "cuda")] + (["cpu"] if DEVICE == "cpu" else [])
KERNELS = BACKENDS[1:3]
SCHEDULE = uf.UBA(8, phi=0.5, warmup_steps=1)


def make_params(seed=0):
    return _make_params(DEVICE, seed=seed)


def _model(seed=0):
    torch.manual_seed(seed)  # nn.Linear's own initialisation, the same for both twins
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(DEVICE)


def _new_storage(params, opt, kept):
    for p in params[::2]:
        kept.append(p.data)
        p.data = p.data.clone()


def _half_float(params, opt, kept, model):
    kept += [p.data for p in params]
    model.half().float()


def _to_float64_and_back(params, opt, kept, model):
    kept += [p.data for p in params]
    model.to(torch.float64).to(torch.float32)  # module._apply, twice


def _state_buffer_replaced(params, opt, kept):
    for p in params[1::2]:
        kept.append(opt.state[p]["exp_avg"])
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone()


def _state_dict_replaced(params, opt, kept):
    p = params[0]
    kept.append(opt.state[p]["exp_avg_sq"])
    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


def _step_replaced(params, opt, kept):
    p = params[-1]
    kept.append(opt.state[p]["step"])
    opt.state[p]["step"] = opt.state[p]["step"].clone()


def _counter_replaced(params, opt, kept):
    group = opt.param_groups[0]
    kept.append(group["schedule_step"])
    group["schedule_step"] = group["schedule_step"].clone()


CHANGES = {"p.data": _new_storage, "half-float": _half_float, "to-float64-and-back": _to_float64_and_back,
           "state-buffer": _state_buffer_replaced, "state-dict": _state_dict_replaced, "step": _step_replaced,
           "counter": _counter_replaced}
ON_MODULES = ("half-float", "to-float64-and-back")


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_change_behind_the_optimizers_back_is_seen_by_the_next_step(backend, change):
    """Every change keeps the values (but half-float's rounding, which the reference does in place): the run that
    replaced storages must go on exactly as the reference, which replaced nothing."""
    models = [_model(), _model()]
    runs = [list(m.parameters()) for m in models]
    opts = [uf.AdamW(ps, lr=0.05, weight_decay=0.1, schedule=SCHEDULE, backend=b)
            for ps, b in zip(runs, ("torch", backend))]
    gen = torch.Generator().manual_seed(1)
    kept = []
    for t in range(5):
        if t in (2, 3):
            if change == "half-float":
                with torch.no_grad():
                    for p in runs[0]:
                        p.copy_(p.half().float())
            CHANGES[change](runs[1], opts[1], kept, *((models[1],) if change in ON_MODULES else ()))
        grads = random_grads(runs[0], gen)
        for ps in runs:
            set_grads(ps, grads)
        for opt in opts:
            opt.step()
        assert_same_runs(*runs, *opts, where=f"step {t}: ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_given_data_of_another_shape_raises_naming_it_and_changes_nothing(backend):
    params = make_params(seed=2)
    opt = uf.AdamW(params, backend=backend, schedule=SCHEDULE)
    gen = torch.Generator().manual_seed(3)
    set_grads(params, random_grads(params, gen))
    opt.step()
    params[6].data = torch.randn(131, generator=gen).to(DEVICE)
    set_grads(params, random_grads(params, gen))
    before = copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[6\] is \(131,\) on {DEVICE}\S*, but its "
                                         rf"state 'exp_avg' is \(129,\) on {DEVICE}\S*: the parameter changed since "
                                         r"its state was made"):
        opt.step()
    after = ([p.detach().clone() for p in params], opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert int(after[1]["param_groups"][0]["schedule_step"]) == 1
    for pid, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after[1]["state"][pid][k]), (pid, k)
    # Dropping its state starts that parameter afresh, as torch.optim would.
    del opt.state[params[6]]
    opt.step()
    assert int(opt.state[params[6]]["step"]) == 1 and int(opt.state[params[0]]["step"]) == 2


def _capturing(monkeypatch, on: bool):
    monkeypatch.setattr(backends, "capturing", lambda devices=(): on)  # CPU tensors, as if CUDA captured


@pytest.mark.parametrize("backend", KERNELS)
def test_a_move_during_or_after_a_capture_raises_and_replays_write_only_what_they_captured(backend, monkeypatch):
    params = make_params(seed=4)
    opt = uf.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        set_grads(params, random_grads(params, gen))
        opt.step()
    kept = params[0].data
    params[0].data = params[0].data.clone()
    _capturing(monkeypatch, True)
    with pytest.raises(uf.CaptureError, match=r"param_groups\[0\]\['params'\]\[0\] \(its storage, dtype or layout\) "
                                              r"changed since the last eager step, during CUDA-graph capture"):
        opt.step()
    _capturing(monkeypatch, False)
    opt.step()  # eager: rebuilds the tables
    _capturing(monkeypatch, True)
    opt.step()  # the capture
    _capturing(monkeypatch, False)
    storages = {s.data_ptr() for s in opt._captures[0].keep if isinstance(s, torch.UntypedStorage)}
    assert params[2].untyped_storage().data_ptr() in storages  # a replay could write it: it is kept alive
    kept = params[2].data
    params[2].data = params[2].data.clone()
    with pytest.raises(uf.CaptureError, match=r"param_groups\[0\]\['params'\]\[2\] \(its storage, dtype or layout\) "
                                              r"changed after a CUDA graph captured this optimizer's step"):
        opt.step()
    del kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_moved_parameter_before_its_first_gradient_and_unchanged_steps_rebuild_nothing(backend):
    """A parameter with no state holds no address: moving it rebuilds nothing; steps that change nothing keep the
    tables (the steady path) and the selections."""
    params = make_params(seed=6)
    opt = uf.Lion(params, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(7)
    grads = random_grads(params, gen, skip=3)
    set_grads(params, grads)
    opt.step()
    held, selections = opt._cache.held, dict(opt._cache.selections)
    params[3].data = params[3].data.clone()  # never had a gradient: no state, in no table
    set_grads(params, grads)
    opt.step()
    assert opt._cache.held is held and opt._cache.selections == selections


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_8bit_scales_are_seen_by_the_next_step(backend):
    """The block scales of 8-bit state (``state["absmax"]``) are written through the tables too: replaced by a copy
    between steps, the next step must write the copy, and the run go on bit for bit as one that replaced nothing."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(80, 64, generator=gen)  # 5120 elements: 8-bit state, 20 blocks
    runs = [[start.clone().to(DEVICE).requires_grad_()] for _ in range(2)]
    opts = [uf.AdamW(ps, lr=0.05, weight_decay=0.1, schedule=SCHEDULE, backend=backend, state_dtype=torch.int8)
            for ps in runs]
    kept = []
    for t in range(4):
        if t == 2:
            st = opts[1].state[runs[1][0]]
            kept.append(st["absmax"])
            st["absmax"] = st["absmax"].clone()
        g = torch.randn(80, 64, generator=gen).to(DEVICE)
        for ps in runs:
            ps[0].grad = g.clone()
        for opt in opts:
            opt.step()
        (p,), (q,) = runs
        assert torch.equal(p, q), f"step {t}: the parameters differ"
        for k, v in opts[0].state[p].items():
            assert torch.equal(opts[1].state[q][k], v), f"step {t}: state {k!r} differs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_replaced_gsnr_is_read_by_the_next_step(backend):
    """SGD-SaI's per-tensor g-SNR is read through its address (the tensor table's "scalar" column) and the cached
    selections: a g-SNR replaced by a tensor of another value (the old one kept alive) must be the one the next steps
    read, as the twin's, changed in place (which no table or selection can miss), is."""
    runs = [make_params(seed=5), make_params(seed=5)]
    opts = [uf.SGDSaI(ps, lr=0.05, momentum=0.8, eps=1e-3, weight_decay=0.1, schedule=SCHEDULE, backend=b)
            for ps, b in zip(runs, ("torch", backend))]
    gen = torch.Generator().manual_seed(6)
    kept = []
    for t in range(4):
        if t == 2:
            for p, q in zip(runs[0][::2], runs[1][::2]):
                opts[0].state[p]["gsnr"].mul_(3.0)
                kept.append(opts[1].state[q]["gsnr"])
                opts[1].state[q]["gsnr"] = opts[1].state[q]["gsnr"] * 3.0
        grads = random_grads(runs[0], gen)
        for ps in runs:
            set_grads(ps, grads)
        for opt in opts:
            opt.step()
        assert_same_runs(*runs, *opts, where=f"step {t}: ")
