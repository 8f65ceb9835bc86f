"""The kernel backends' gradient-address path, and the rules of CUDA-graph capture, with a simulated capture.

In a real training loop every gradient moves every step (backward allocates new ones). The kernels
read the addresses from one device table per plan, refreshed by one copy per step; a step captured
into a CUDA graph reads a table of its own. A capture is simulated by making ``backends.capturing()``
answer True for one step: that runs the optimizer's capture path (its own table, the rules, what it
keeps) eagerly. Without a GPU it runs on CPU tensors, the kernels in their test modes; on a GPU machine
on CUDA tensors, the kernels natively (pinned rows included). Replays need a GPU: tests/test_kernels.py
and tests/test_gpu_loops.py have them.
"""

import copy
import functools

import numpy as np
import pytest
import torch

import uba_fused as uf
from uba_fused import backends
from uba_fused.backends import plan as plan_module

from harness import CASE_IDS, CASES, assert_same_runs, make_params as _make_params, random_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_AVAIL = backends.availability(DEVICE)
KERNELS = [pytest.param(b, marks=pytest.mark.skipif(_AVAIL[b] is not None, reason=str(_AVAIL[b])))
           for b in ("triton", "cuda")]
SCHEDULE = uf.UBA(12, phi=0.5, warmup_steps=2)


def make_params(seed=0):
    return _make_params(DEVICE, seed=seed)


def _grads(params, gen):
    """Fresh gradient tensors: new addresses, as backward gives."""
    return [None if g is None else g.clone() for g in random_grads(params, gen)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", CASES[::2] + CASES[-1:], ids=CASE_IDS[::2] + CASE_IDS[-1:])
def test_moved_gradients_are_read_where_they_are_now(case, backend):
    """Every step's gradients are new tensors, and the last step's are poisoned (NaN) before the next step
    runs, so a kernel reading a stale address fails. Some steps keep the addresses, some drop a gradient."""
    a, b = make_params(seed=1), make_params(seed=1)
    opt_a, opt_b = case.make(a, backend="torch", schedule=SCHEDULE), case.make(b, backend=backend, schedule=SCHEDULE)
    gen = torch.Generator().manual_seed(2)
    old = []
    for t in range(8):
        grads = _grads(a, gen)
        if t == 5:
            grads[2] = None
        for ps in (a, b):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
        if t in (3, 4):  # the same tensors again, refilled in place: the addresses hold
            for q, g in zip(b, grads):
                if g is not None:
                    old_q = next(o for o in old if o.shape == q.shape)
                    old_q.copy_(g)
                    q.grad = old_q
            old = []
        for g in old:
            g.fill_(float("nan"))
        opt_a.step()
        opt_b.step()
        assert_same_runs(a, b, opt_a, opt_b)
        old = [q.grad for q in b if q.grad is not None]


def _capturing(monkeypatch, on: bool):
    monkeypatch.setattr(backends, "capturing", lambda devices=(): on)  # as if CUDA captured


def _warmed(backend, steps=2, seed=3, cls=uf.AdamW):
    params = make_params(seed=seed)
    opt = cls([{"params": params[:4]}, {"params": params[4:], "lr": 0.02, "schedule": uf.Cosine(10)}],
              lr=0.01, backend=backend, schedule=SCHEDULE)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()
    return params, opt, gen


def _step_both(a, b, opt_a, opt_b, grads, monkeypatch, captured: bool):
    """One step of the reference run and of the kernel run on the same gradients, the kernel's captured (as
    simulated) or not; they must agree."""
    for ps in (a, b):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
    _capturing(monkeypatch, captured)
    opt_a.step()
    opt_b.step()
    _capturing(monkeypatch, False)
    assert_same_runs(a, b, opt_a, opt_b)


def _spy_tables(monkeypatch):
    """The gradient table each step's kernels read, as Plan.for_step hands it to them."""
    tables, for_step = [], plan_module.Plan.for_step.__func__

    def spy(cls, *args, **kwargs):
        plan, table = for_step(cls, *args, **kwargs)
        tables.append(table)
        return plan, table

    monkeypatch.setattr(plan_module.Plan, "for_step", classmethod(spy))
    return tables


@pytest.mark.parametrize("backend", KERNELS)
def test_a_captured_step_computes_like_an_eager_one_and_reads_its_own_table(backend, monkeypatch):
    a, opt_a, gen_a = _warmed("torch")
    b, opt_b, _ = _warmed(backend)
    plan = opt_b._cache.plans[backend]
    eager_table = plan.grads.clone()
    tables = _spy_tables(monkeypatch)
    for t in range(4):
        _step_both(a, b, opt_a, opt_b, _grads(a, gen_a), monkeypatch, captured=t == 1)
        if t == 1:  # the captured step read a table of its own, and left the plan's as the last eager step wrote it
            assert torch.equal(plan.grads, eager_table)
            table = tables[-1]
            assert table.data_ptr() != plan.grads.data_ptr()
            for q, address in zip(b, table[:-1].tolist()):
                if q.grad.stride() == q.stride():
                    assert address == q.grad.data_ptr()
                else:  # walked as a copy in the parameter's layout
                    assert address != q.grad.data_ptr()
            assert opt_b._captures[0].keep.count(plan) == 1
        eager_table = plan.grads.clone()


@pytest.mark.parametrize("backend", KERNELS)
def test_a_captured_step_that_clips_computes_like_an_eager_one(backend, monkeypatch):
    clipped = functools.partial(uf.Adan, max_grad_norm=0.2)
    a, opt_a, gen_a = _warmed("torch", cls=clipped)
    b, opt_b, _ = _warmed(backend, cls=clipped)
    for t in range(3):
        grads = _grads(a, gen_a)
        assert np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)) > 0.2  # clipped at every step
        _step_both(a, b, opt_a, opt_b, grads, monkeypatch, captured=t == 1)


@pytest.mark.parametrize("backend", KERNELS)
def test_a_capture_keeps_only_what_replays_use_after_the_step(backend, monkeypatch):
    """A capture keeps the plan and (on CUDA) the pinned row its copy reads, and the storages its kernels write.
    The device memory the step allocated (its table, relayout copies, the clipping norm) is used within each
    replay only: it lives in the graph's pool and goes with the graph, so the optimizer holds none of it."""
    clipped = functools.partial(uf.Adan, max_grad_norm=0.3)
    a, opt_a, gen_a = _warmed("torch", cls=clipped)
    b, opt_b, _ = _warmed(backend, cls=clipped)
    for t in range(3):
        _step_both(a, b, opt_a, opt_b, _grads(a, gen_a), monkeypatch, captured=t == 1)
    [capture] = opt_b._captures
    tensors = [k for k in capture.keep if isinstance(k, torch.Tensor)]
    plans = [k for k in capture.keep if isinstance(k, plan_module.Plan)]
    storages = [k for k in capture.keep if isinstance(k, torch.UntypedStorage)]
    assert len(plans) == 1 and len(plans) + len(tensors) + len(storages) == len(capture.keep)
    if DEVICE == "cuda":  # the pinned row of this capture's gradient addresses
        [row] = tensors
        assert row.is_pinned() and row.shape == plans[0].grads.shape
    else:
        assert tensors == []
    written = {p.untyped_storage().data_ptr() for p in b if p.numel()}
    written |= {v.untyped_storage().data_ptr() for p in b for v in opt_b.state[p].values()}
    assert written <= {s.data_ptr() for s in storages}


@pytest.mark.parametrize("backend", KERNELS)
def test_a_capture_keeps_the_table_its_replays_read(backend, monkeypatch):
    """A Table schedule's factors are read by every replay: the capture keeps their storage, so that putting another
    schedule in the group's place (which the next step() refuses) never leaves the replays reading freed memory."""
    table = uf.Table.of(SCHEDULE, 13, DEVICE)
    a, opt_a, gen_a = _warmed("torch", cls=functools.partial(uf.SGD, momentum=0.9))
    b, opt_b, _ = _warmed(backend, cls=functools.partial(uf.SGD, momentum=0.9))
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["schedule"] = table
    for t in range(3):
        _step_both(a, b, opt_a, opt_b, _grads(a, gen_a), monkeypatch, captured=t == 1)
    [capture] = opt_b._captures
    kept = {k.data_ptr() for k in capture.keep if isinstance(k, torch.UntypedStorage)}
    assert table.factors.untyped_storage().data_ptr() in kept


@pytest.mark.parametrize("backend", KERNELS)
def test_captures_in_a_row_take_rows_set_aside_before_and_share_equal_ones(backend, monkeypatch):
    """One graph per sequence-length bucket: warm every bucket up, then capture every one, with no eager step
    between the captures. No capture may pin memory (a capture may refuse it): each takes a row set aside by
    the eager steps, and a capture that finds the addresses of an earlier one shares its row."""
    monkeypatch.setattr(plan_module, "_pinned_rows", lambda n, width: torch.zeros((n, width), dtype=torch.int64))
    params, opt, gen = _warmed(backend)
    opt._cache.scan._cuda = True  # as on CUDA, where rows are pinned: here plain tensors stand in for them
    opt.step()  # an eager step sets rows aside

    def refuse(*args, **kwargs):
        raise RuntimeError("pinned memory asked for during a capture")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    rows, grads, held = [], [], []
    for i in range(4):
        if i < 3:  # laid out as their parameters: nothing copied, so the 4th capture finds the 3rd's addresses
            grads = [torch.empty_like(p).copy_(g) for p, g in zip(params, _grads(params, gen))]
            held.append(grads)  # alive, so no later set takes their addresses (CUDA's caching allocator would)
        for p, g in zip(params, grads):
            p.grad = g
        _capturing(monkeypatch, True)
        opt.step()
        _capturing(monkeypatch, False)
        [row] = [k for k in opt._captures[-1].keep if isinstance(k, torch.Tensor)]
        assert row[:-1].tolist() == [g.data_ptr() for g in grads]
        rows.append(row)
    assert len({r.data_ptr() for r in rows[:3]}) == 3 and rows[3] is rows[2]


@pytest.mark.parametrize("backend", KERNELS)
def test_an_eager_step_after_a_capture_reads_its_gradients_even_at_the_captured_addresses(backend, monkeypatch):
    """The captured step's addresses went to the graph's table only; the next eager step, with the very same
    gradient tensors, must copy them into the plan's own table rather than trust it."""
    a, opt_a, gen = _warmed("torch", seed=5)
    b, opt_b, _ = _warmed(backend, seed=5)
    _step_both(a, b, opt_a, opt_b, _grads(a, gen), monkeypatch, captured=True)
    with torch.no_grad():
        for p, q, g in zip(a, b, _grads(a, gen)):
            p.grad.copy_(g)
            q.grad.copy_(g)  # refilled in place: the addresses the capture saw
    opt_a.step()
    opt_b.step()
    assert_same_runs(a, b, opt_a, opt_b)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_the_rules_of_capture_raise_naming_the_rule(backend, monkeypatch):
    # State not created before capture.
    params = make_params()
    opt = uf.AdamW(params, backend=backend)
    for p, g in zip(params, _grads(params, torch.Generator().manual_seed(0))):
        p.grad = g
    _capturing(monkeypatch, True)
    with pytest.raises(uf.CaptureError, match=r"param_groups\[0\]\['params'\]\[0, 1, 2, 3, 4, 5, 6\] have no state"):
        opt.step()
    _capturing(monkeypatch, False)
    assert len(opt.state) == 0 and not opt._captures

    # A parameter that had no gradient during the warm-up (so no state) has one in the capture.
    params, opt, gen = _warmed(backend)
    for p in params[4:]:
        del opt.state[p]  # as if they had had no gradient: no state
    opt._cache.clear()
    _capturing(monkeypatch, True)
    with pytest.raises(uf.CaptureError, match=r"param_groups\[1\]\['params'\]\[0, 1, 2\] have no state yet"):
        opt.step()
    _capturing(monkeypatch, False)
    # A parameter without a gradient in the capture, but with state: the graph skips it, like an eager step.
    params, opt, gen = _warmed(backend)
    params[1].grad = None
    _capturing(monkeypatch, True)
    opt.step()
    _capturing(monkeypatch, False)

    if backend != "torch":  # the torch backend reads the host values at every step: nothing to re-upload
        # A state dict loaded, and no eager step since: no device tables for the capture.
        params, opt, gen = _warmed(backend)
        opt.load_state_dict(opt.state_dict())
        _capturing(monkeypatch, True)
        with pytest.raises(uf.CaptureError, match="found no device tables for these parameters"):
            opt.step()
        _capturing(monkeypatch, False)
        # A hyper-parameter changed between the warm-up and the capture.
        params, opt, gen = _warmed(backend)
        opt.param_groups[1]["weight_decay"] = 0.5
        _capturing(monkeypatch, True)
        with pytest.raises(uf.CaptureError, match=r"param_groups\[1\]: hyper-parameters changed since the last eager"):
            opt.step()
        _capturing(monkeypatch, False)

    # After a capture: a changed hyper-parameter, a new group, a loaded state dict.
    params, opt, gen = _warmed(backend)
    _capturing(monkeypatch, True)
    opt.step()
    _capturing(monkeypatch, False)
    sd = opt.state_dict()
    with pytest.raises(uf.CaptureError, match="Setting a param group's 'lr' to 0.5 cannot take effect: a CUDA graph "
                                              "captured this optimizer's step"):
        opt.param_groups[0]["lr"] = 0.5
    opt.param_groups[0]["lr"] = 0.01  # the same value: allowed, as a constant scheduler sets it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    with pytest.raises(uf.CaptureError, match="'lr'"):
        sched.step()
    with pytest.raises(uf.CaptureError, match="add_param_group: a new param group cannot take effect"):
        opt.add_param_group({"params": [torch.zeros(3, device=DEVICE, requires_grad=True)]})
    with pytest.raises(uf.CaptureError, match="load_state_dict cannot take effect"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.01 and len(opt.param_groups) == 2
    # Eager steps go on; a copy of the optimizer is not captured by anything.
    opt.step()
    twin = copy.deepcopy(opt)
    twin.param_groups[0]["lr"] = 0.5
    twin.add_param_group({"params": [torch.zeros(3, device=DEVICE, requires_grad=True)]})


def test_a_tensor_lr_must_live_on_the_parameters_device():
    params = make_params()  # on the GPU where there is one
    with pytest.raises(ValueError, match=rf"lr as a tensor must be on the parameters' device \({params[0].device}\), "
                                         rf"got meta"):
        uf.AdamW(params, lr=torch.tensor(0.1, device="meta"))


@pytest.mark.parametrize("backend", KERNELS)
def test_the_address_path_without_the_extensions_scanner(backend):
    """Where uba_fused._C is missing (backend "triton" alone), GradScan takes its Python path every step:
    moved, missing and re-laid-out gradients, and a mismatched one, as with the C++ pass."""
    a, b = make_params(seed=6), make_params(seed=6)
    opt_a, opt_b = uf.Lion(a, backend="torch", lr=0.1), uf.Lion(b, backend=backend, lr=0.1)
    gen = torch.Generator().manual_seed(7)
    for t in range(5):
        grads = _grads(a, gen)
        grads[t % 3] = None
        for ps in (a, b):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
        if t == 0:
            opt_a.step()
            opt_b.step()
            opt_b._cache.scan._c = None  # as if the extension were not built
            continue
        opt_a.step()
        opt_b.step()
        assert_same_runs(a, b, opt_a, opt_b)
    b[3].grad.data = torch.zeros(2, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[3\] has a gradient of shape \(2,\)"):
        opt_b.step()
