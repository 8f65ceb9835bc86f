"""torch.compile sees the step (issue #25): ``opt.step()`` is the custom op ``uba_fused::step`` (uba_fused/compiled.py),
so a whole training step compiles with ``fullgraph=True``, ``torch.compile(opt.step)`` works, and neither a changed lr
nor an advancing step recompiles. On CPU with backends "torch" and "cpu"; the GPU cases (reduce-overhead) are in
tests/test_gpu_loops.py.

Most cases compile with ``backend="aot_eager"``: AOTAutograd's functionalization without Inductor's code, so the
forward and backward run the same kernels as eager and a compiled run must equal the eager one bit for bit (and every
input the op mutates reaches it as a copy, the path Inductor takes for what it cannot re-inplace). One case compiles
with Inductor, which re-inplaces the parameters, within the rounding of its fused forward and backward."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import uba_fused as uf

from harness import CASES

from test_kernels import DEVICE, KERNELS

_BY_RULE = {}
for _case in CASES:
    _BY_RULE.setdefault(_case.rule, _case)
MAKERS = {rule: case.make for rule, case in _BY_RULE.items()}
MAKERS["adagrad_norm"] = lambda ps, **kw: uf.AdagradNorm(ps, lr=0.05, initial_accumulator_value=0.1, **kw)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # (loss.backward() inside a fullgraph)
        yield
    torch._dynamo.reset()


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(n)]


def _train_step(model, opt):
    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _graphs() -> int:
    """The graphs Dynamo compiled since the last reset (a recompile makes one more)."""
    return counters["stats"]["unique_graphs"]


def _run(rule: str, backend: str, compile_with: str | None, steps: int = 5, device: str = "cpu", **kw):
    """``steps`` training steps of a small model (the first eager), compiled after it with ``compile_with``: the losses,
    the parameters and the optimizer."""
    model = _model(1).to(device)
    opt = MAKERS[rule](list(model.parameters()), backend=backend, schedule=uf.Linear(steps, warmup_steps=1), **kw)
    step = _train_step(model, opt)
    compiled = step if compile_with is None else torch.compile(step, backend=compile_with, fullgraph=True)
    losses = [(step if t == 0 else compiled)(x.to(device), y.to(device)) for t, (x, y) in enumerate(_batches(steps, 2))]
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], opt


def _each_rule_on_both_backends() -> list:
    return [pytest.param(rule, backend, id=f"{rule}-{backend}") for rule in MAKERS for backend in ("torch", "cpu")]


@pytest.mark.parametrize("rule,backend", _each_rule_on_both_backends())
def test_a_fullgraph_training_step_equals_eager(rule, backend):
    """Forward, backward, opt.step() and opt.zero_grad() in one graph (fullgraph: no break), for every rule: bit for bit
    the eager run, the schedule's counter advanced by every step, compiled once."""
    la, pa, _ = _run(rule, backend, None)
    lb, pb, opt = _run(rule, backend, "aot_eager")
    assert torch.equal(la, lb), (la, lb)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert int(opt.param_groups[0]["schedule_step"]) == 5 and _graphs() == 1


@pytest.mark.parametrize("backend", KERNELS)
def test_a_fullgraph_training_step_equals_eager_on_the_kernel_backends(backend):
    """The kernel backends (in their CPU modes: Triton's interpreter, the CUDA kernel body built for the host), which
    write through their device tables: bit for bit the eager run under aot_eager, where every mutated input reaches
    the op as a copy."""
    la, pa, _ = _run("adamw", backend, None, device=DEVICE)
    lb, pb, opt = _run("adamw", backend, "aot_eager", device=DEVICE)
    assert torch.equal(la, lb)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert _graphs() == 1


def test_inductor_fullgraph_step_matches_eager():
    """Inductor's graph (its own forward and backward kernels; the parameters re-inplaced into the op), within their
    rounding: an update skipped or applied twice moves the loss by percents."""
    la, pa, _ = _run("adamw", "cpu", None)
    lb, pb, _ = _run("adamw", "cpu", "inductor")
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert _graphs() == 1


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_fifty_steps_and_an_lr_change_recompile_nothing(lr_kind):
    """After one eager step, 50 compiled steps through a UBA schedule, with the lr changed at step 20 (a float set in
    the group, or a tensor lr filled in place): one compile, and the changed lr applied (equal to the eager run)."""
    def run(compile_with):
        model = _model(3)
        lr = 0.02 if lr_kind == "float" else torch.tensor(0.02)
        opt = uf.AdamW(model.parameters(), lr=lr, backend="cpu", schedule=uf.UBA(50, warmup_steps=5))
        step = _train_step(model, opt)
        compiled = step if compile_with is None else torch.compile(step, backend=compile_with, fullgraph=True)
        for t, (x, y) in enumerate(_batches(51, 4)):
            if t == 20:
                if lr_kind == "float":
                    with pytest.warns(UserWarning, match="the two schedules multiply"):  # (said once, by the step)
                        opt.param_groups[0]["lr"] = 0.005
                        (step if t == 0 else compiled)(x, y)
                    continue
                opt.param_groups[0]["lr"].fill_(0.005)
            (step if t == 0 else compiled)(x, y)
        return [p.detach().clone() for p in model.parameters()], opt

    pa, _ = run(None)
    pb, opt = run("aot_eager")
    assert _graphs() == 1, _graphs()
    assert float(opt.get_last_lr()[0]) == pytest.approx(0.005 * uf.UBA(50, warmup_steps=5).factor(50), abs=1e-12)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_compile_of_opt_step_equals_eager():
    """torch.compile(opt.step), fullgraph, with backward outside as users write it: bit for bit the eager steps, one
    compile for all of them (the first step, which makes the state, included: it compiles again once)."""
    def run(compiled: bool):
        model = _model(5)
        opt = uf.Lion(model.parameters(), lr=1e-2, weight_decay=0.1, backend="torch")
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        for x, y in _batches(6, 6):
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    pa, pb = run(False), run(True)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert _graphs() == 2  # before the state is made, and after


def test_the_op_passes_opcheck():
    """torch.library.opcheck: the schema says what the op mutates, its fake implementation fits it, and it behaves
    the same under AOTAutograd (each check steps copies of the optimizer's tensors, from the same values)."""
    model = _model(7)
    opt = uf.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="cpu", schedule=uf.Cosine(20))
    x, y = _batches(1, 8)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    args = opt._graph_args
    torch.library.opcheck(torch.ops.uba_fused.step.default,
                          (args.key, args.params, [p.grad for p in args.params], args.state))


def test_a_parameter_given_new_storage_between_compiled_steps_is_followed():
    """``p.data = ...`` between compiled steps: the op's step finds the move (backends/step.py's checks run inside it)
    and updates the new storage, never the old one, as an eager twin that does the same."""
    def run(compile_with):
        model = _model(9)
        opt = uf.AdamW(model.parameters(), lr=1e-2, backend="cpu")
        step = _train_step(model, opt)
        compiled = step if compile_with is None else torch.compile(step, backend=compile_with, fullgraph=True)
        old = None
        for t, (x, y) in enumerate(_batches(6, 10)):
            if t == 3:
                old = model[0].weight.data
                model[0].weight.data = old.clone()
                kept = old.clone()
            (step if t == 0 else compiled)(x, y)
        assert torch.equal(old, kept)  # the old storage is not written after the move
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run("aot_eager")):
        assert torch.equal(a, b)


def test_a_compiled_step_records_the_norm_history_as_eager():
    """record_grad_norms before compiling: the compiled steps write the same history (the op is handed it) and the
    same grad_norm, and clipping by that norm inside the graph clips as eager."""
    def run(compile_with):
        model = _model(11)
        opt = uf.SGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.5, backend="cpu")
        history = opt.record_grad_norms(4)
        step = _train_step(model, opt)
        compiled = step if compile_with is None else torch.compile(step, backend=compile_with, fullgraph=True)
        for t, (x, y) in enumerate(_batches(5, 12)):
            (step if t == 0 else compiled)(x, y)
        return history.clone(), opt.grad_norm.clone(), [p.detach().clone() for p in model.parameters()]

    (ha, na, pa), (hb, nb, pb) = run(None), run("aot_eager")
    assert torch.equal(ha, hb) and not ha.isnan().any() and torch.equal(na, nb)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_gradscalers_hand_over_inside_a_compiled_step_reaches_the_op():
    """GradScaler's hand-over (opt.grad_scale and opt.found_inf set around step(), as its step() does) inside the
    compiled function: the op takes them as arguments (an attribute set in a graph is set on the object only after
    it), so the scale is divided out and an inf step skipped, as eager."""
    def run(compile_with):
        model = _model(13)
        opt = uf.AdamW(model.parameters(), lr=1e-2, backend="cpu")

        def step(x, y, found):
            (torch.nn.functional.mse_loss(model(x), y) * 512.0).backward()
            opt.grad_scale, opt.found_inf = torch.full((1,), 512.0), found
            opt.step()
            del opt.grad_scale, opt.found_inf
            opt.zero_grad(set_to_none=True)

        compiled = step if compile_with is None else torch.compile(step, backend=compile_with, fullgraph=True)
        for t, (x, y) in enumerate(_batches(5, 14)):
            (step if t == 0 else compiled)(x, y, torch.full((1,), float(t == 3)))
        return [p.detach().clone() for p in model.parameters()], opt

    pa, _ = run(None)
    try:
        pb, ob = run("aot_eager")
    except Exception as exc:  # (torch 2.11's Dynamo: an AssertionError from its side effects)
        if "Attempted setattr on a user-defined object" in str(exc):
            pytest.skip("this torch's Dynamo cannot set an optimizer's attribute inside a compiled function")
        raise
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    p = next(iter(ob.state))
    assert float(ob.state[p]["step"]) == 4 and not hasattr(ob, "grad_scale")  # (step 3 skipped)


def test_a_compiled_function_may_read_the_param_groups():
    """Code inside a compiled function that reads opt.param_groups (an lr logged, a torch LR scheduler's step):
    Dynamo's optimizer support takes each group for a plain dict, and failed inside on the dict subclass that guards
    captured groups; the groups are plain dicts until a CUDA graph captures a step."""
    model = _model(15)
    opt = uf.SGD(model.parameters(), lr=0.1, backend="cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def scaled(x):
        return x * opt.param_groups[0]["lr"]

    x = torch.randn(3, generator=torch.Generator().manual_seed(16))
    torch.testing.assert_close(scaled(x), x * 0.1)
    assert all(type(g) is dict for g in opt.param_groups)


def _mutated_and_static_inputs(fn, *args) -> tuple[set[int], set[int]]:
    """Compile ``fn`` fullgraph through AOTAutograd and return its forward graph's inputs that the graph mutates and
    those marked static: the two sets reduce-overhead's CUDA-graph trees compare, skipping a graph ("mutated inputs")
    where a mutated input is not static, as it copies each other input into its own pool on every replay."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext
    seen = {}

    def forward_compiler(gm, inputs):
        meta = TracingContext.get().fw_metadata
        seen["mutated"] = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        seen["static"] = set(meta.static_input_indices)
        return gm.forward

    torch.compile(fn, backend=lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=forward_compiler),
                  fullgraph=True)(*args)
    return seen["mutated"], seen["static"]


@pytest.mark.parametrize("what", ["train-step", "opt.step"])
def test_every_input_the_op_mutates_is_a_static_input(what):
    """What reduce-overhead needs of the op, checked on CPU (a GPU runs it: tests/test_gpu_loops.py): each tensor the
    step writes (parameters, state, counters, lrs) is a static input of the graph, so CUDA-graph trees replay the
    step in place rather than skipping the graph. Two groups (two counters, two lrs), with backward inside the graph
    or outside it (gradients as inputs)."""
    model = _model(17)
    params = list(model.parameters())
    opt = uf.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], backend="cpu",
                   schedule=uf.UBA(100), max_grad_norm=1.0)
    step = _train_step(model, opt)
    (x, y), (x2, y2) = _batches(2, 18)
    step(x, y)  # (the state exists: the graph's inputs are the final ones)
    if what == "train-step":
        mutated, static = _mutated_and_static_inputs(step, x2, y2)
    else:
        torch.nn.functional.mse_loss(model(x2), y2).backward()
        mutated, static = _mutated_and_static_inputs(opt.step)
    n_state = len(opt._graph_args.state)
    # the parameters; each group's counter and lr; exp_avg and exp_avg_sq; each group's vector of step counts;
    # clipping's grad_norm
    assert len(mutated) == len(params) + n_state == 4 + 2 * 2 + 4 * 2 + 2 + 1
    assert mutated <= static, sorted(mutated - static)


def test_a_capture_that_guards_the_groups_recompiles_nothing():
    """A CUDA-graph capture of the step (reduce-overhead's recording runs the op under one) turns the groups into
    the dicts that refuse a float lr (``_guard_groups``): the compiled training step reads no group, so its guards
    still hold and it runs on without compiling again."""
    model = _model(19)
    opt = uf.AdamW(model.parameters(), lr=1e-2, backend="cpu")
    step = _train_step(model, opt)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for t, (x, y) in enumerate(_batches(5, 20)):
        if t == 3:
            opt._guard_groups()  # (what backends/step.py's _captured does)
        (step if t == 0 else compiled)(x, y)
    assert _graphs() == 1
    assert not any(type(g) is dict for g in opt.param_groups)


def test_compile_of_opt_step_on_dtensor_parameters_equals_eager():
    """DTensor parameters (FSDP2's, tensor parallelism's) on a one-rank gloo mesh, placed Shard(0), Shard(1) and
    Replicate(): their step stays outside the graph (a graph break; compiled.py says why), and torch.compile(opt.step)
    without fullgraph steps bit for bit as eager, clipping's norm summed over the mesh. FSDP2 gives a parameter a new
    local tensor at step 3 (its reset_sharded_param): the new one is updated, and the old is not written."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from harness import one_rank_mesh

    def run(mesh, compiled: bool):
        gen = torch.Generator().manual_seed(21)
        ps = [torch.nn.Parameter(DTensor.from_local(torch.randn(6, 5, generator=gen), mesh, [pl]))
              for pl in (Shard(0), Shard(1), Replicate())]
        opt = uf.AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, backend="cpu", schedule=uf.UBA(8))
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        old = kept = None
        for t in range(6):
            for p in ps:
                p.grad = DTensor.from_local(torch.randn(6, 5, generator=gen), mesh, p.placements)
            if t == 3:
                old = ps[0]._local_tensor
                ps[0]._local_tensor, kept = old.clone(), old.clone()
            (opt.step if t == 0 else step)()
        assert torch.equal(old, kept)
        return [p.to_local().clone() for p in ps], opt

    with one_rank_mesh() as mesh:
        (pa, oa), (pb, ob) = run(mesh, False), run(mesh, True)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert torch.equal(oa.grad_norm, ob.grad_norm)
    assert [int(g["schedule_step"]) for g in ob.param_groups] == [6]


def test_no_two_tensors_the_op_writes_overlap():
    """The op's mutable arguments are disjoint: each step count is a 0-dim view of one vector per device, and handed
    over one by one they overlapped, which Inductor (torch 2.11, the GPU machine's) wrote back only in part: the
    counts of all but the first parameters stopped advancing, and AdamW's bias correction and SGD's first-step
    momentum went wrong (this file's Inductor case, 3e-3 from eager). The op now takes each vector whole."""
    model = _model(23)
    opt = uf.AdamW(model.parameters(), lr=1e-2, backend="cpu", max_grad_norm=1.0)
    opt.record_grad_norms(3)
    x, y = _batches(1, 24)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    args = opt._graph_args
    spans = sorted((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in args.params + args.state)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), spans
    steps = [opt.state[p]["step"] for p in model.parameters()]
    assert steps[0]._base is not None and any(t is steps[0]._base for t in args.state)


@pytest.mark.parametrize("compile_with", ["aot_eager", "inductor"])
def test_parameters_that_share_a_storage_step_outside_the_graph_as_eager(compile_with):
    """Parameters that are views of one flat buffer would be mutable arguments of the op in one storage (Inductor,
    torch 2.11: NaN parameters, and step counts no longer whole numbers): their step stays outside the graph, and
    equals eager's."""
    def run(compiled):
        model = _model(25)
        params = list(model.parameters())
        flat = torch.cat([p.detach().flatten() for p in params])
        at = 0
        for p in params:
            p.data = flat[at:at + p.numel()].view(p.shape)
            at += p.numel()
        opt = uf.SGD(params, lr=0.1, momentum=0.9, backend="cpu")
        step = torch.compile(opt.step, backend=compile_with) if compiled else opt.step
        for t, (x, y) in enumerate(_batches(4, 26)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            (opt.step if t == 0 else step)()
            opt.zero_grad(set_to_none=True)
        assert opt._graph_args is None
        return flat.clone(), [float(opt.state[p]["step"]) for p in params]

    (fa, sa), (fb, sb) = run(False), run(True)
    assert torch.equal(fa, fb) and sa == sb == [4.0] * 4
