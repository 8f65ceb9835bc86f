"""Real training loops on a GPU: the whole iteration in one CUDA graph (with float32 state and clipping), two
graphs sharing a memory pool, torch.compile's reduce-overhead mode with the step inside its graph, steps enqueued
behind a stalled stream and on two streams, and what step() asks of the host (one pinned copy when gradients moved,
none when not, no pageable copy, no sync). Skipped without a GPU; the capture path's logic and rules are also checked
with a simulated capture in tests/test_capture.py.
"""

import pytest
import torch

import uba_fused as uf
from uba_fused import backends

from harness import CASE_IDS, CASES, assert_same_runs, set_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
_AVAIL = backends.availability("cuda") if torch.cuda.is_available() else {"triton": "no GPU", "cuda": "no GPU"}
KERNELS = [pytest.param(b, marks=pytest.mark.skipif(_AVAIL[b] is not None, reason=str(_AVAIL[b])))
           for b in ("triton", "cuda")]
STEPS, WARMUP = 9, 3


class Loop:
    """A tiny model as a list of parameters in two dtypes, two param groups with their own schedules, and a
    parameter that never gets a gradient. The loss is elementwise, so eager and graph compute bit for bit
    the same: loss = sum over params of sum((p * x)^2), with x the step's input."""

    def __init__(self, case, backend, seed=0, variant="plain"):
        gen = torch.Generator().manual_seed(seed)
        shapes32, shapes16 = [(2 * 4096 + 3,), (64, 33), (1,), (7,)], [(5000,), (31,)]
        self.params = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in shapes32] + \
                      [torch.randn(s, generator=gen).cuda().bfloat16().requires_grad_() for s in shapes16]
        self.frozen = self.params[3]  # in a group, never in the loss
        # "fp32-state-clip": the bf16 group keeps float32 state, and every group clips by the global norm (about
        # 400 here: every step clips); backend "cuda" then runs a pre-pass and two storages per step.
        extra = dict(max_grad_norm=20.0) if variant == "fp32-state-clip" else {}
        state = dict(state_dtype=torch.float32) if variant == "fp32-state-clip" else {}
        self.opt = case.make([{"params": self.params[:4], "schedule": uf.UBA(STEPS, phi=0.5, warmup_steps=2)},
                              {"params": self.params[4:], "schedule": uf.Cosine(STEPS + 2), "weight_decay": 0.3,
                               **state}], backend=backend, **extra)
        self.inputs = [[torch.randn(p.shape, generator=gen).cuda() for p in self.params] for _ in range(STEPS + 2)]
        self.static = [torch.zeros(p.shape, device="cuda") for p in self.params]

    def iteration(self, scale=1.0):
        loss = sum(((p.float() * x) ** 2).sum() for p, x in zip(self.params, self.static) if p is not self.frozen)
        (loss * scale).backward()
        self.opt.step()
        return loss

    def feed(self, t):
        for s, x in zip(self.static, self.inputs[t]):
            s.copy_(x)

    def eager(self, steps):
        losses = []
        for t in steps:
            self.feed(t)
            self.opt.zero_grad(set_to_none=True)
            losses.append(self.iteration().detach().clone())
        return losses

    def graphed(self):
        """PyTorch's whole-iteration recipe: warm-up on a side stream, capture, then replays that need
        nothing from the host but the next input."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self.eager(range(WARMUP))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = self.iteration()
        for t in range(WARMUP, STEPS):
            self.feed(t)
            graph.replay()
            losses.append(static_loss.detach().clone())
        return graph, losses

    def snapshot(self):
        state = {i: {k: v.clone() for k, v in self.opt.state[p].items()} for i, p in enumerate(self.params)
                 if p in self.opt.state}
        counters = [g["schedule_step"].clone() for g in self.opt.param_groups]
        return [p.detach().clone() for p in self.params], state, counters, [x.clone() for x in self.opt.get_last_lr()]


def _assert_identical(a, b):
    (pa, sa, ca, la), (pb, sb, cb, lb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"param {i}"
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"param {i} state {k}"
    assert all(torch.equal(x, y) for x, y in zip(ca, cb)), "schedule_step"
    assert all(torch.equal(x, y) for x, y in zip(la, lb)), "get_last_lr"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("variant", ["plain", "fp32-state-clip"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_whole_iteration_graph_equals_eager_and_eager_steps_after_it(case, variant, backend):
    eager = Loop(case, backend, variant=variant)
    eager_losses = eager.eager(range(STEPS))
    graphed = Loop(case, backend, variant=variant)
    graph, graph_losses = graphed.graphed()
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(eager_losses, graph_losses)), "losses"
    _assert_identical(eager.snapshot(), graphed.snapshot())
    assert [int(g["schedule_step"]) for g in graphed.opt.param_groups] == [STEPS, STEPS]
    assert graphed.frozen not in graphed.opt.state  # no gradient, ever: no state, as torch.optim
    # After the graph: eager steps on the same optimizer, with gradients wherever backward puts them.
    eager.eager([STEPS, STEPS + 1])
    graphed.eager([STEPS, STEPS + 1])
    torch.cuda.synchronize()
    _assert_identical(eager.snapshot(), graphed.snapshot())
    del graph


@pytest.mark.parametrize("backend", KERNELS)
def test_two_graphs_sharing_a_memory_pool_replayed_in_turn_equal_eager(backend):
    """One graph per bucket (two iterations that differ, here by the loss's scale), all warmed up, then captured
    one after the other into one memory pool with no eager step between, then replayed in turn: the same
    parameters, state and counters as the same iterations run eagerly."""
    scales = (1.0, 0.25)
    eager, graphed = Loop(CASES[0], backend, variant="fp32-state-clip"), Loop(CASES[0], backend,
                                                                                variant="fp32-state-clip")
    order = [0, 1, 1, 0, 1, 0]
    for t, k in enumerate([0, 1, 0, 1] + order):
        eager.feed(t)
        eager.opt.zero_grad(set_to_none=True)
        eager.iteration(scales[k])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # every bucket's warm-up
        for t, k in enumerate([0, 1, 0, 1]):
            graphed.feed(t)
            graphed.opt.zero_grad(set_to_none=True)
            graphed.iteration(scales[k])
    torch.cuda.current_stream().wait_stream(side)
    graphs, pool = [], None
    for k in (0, 1):  # captured one after the other: the second capture has no eager step before it
        graph = torch.cuda.CUDAGraph()
        graphed.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=pool):
            graphed.iteration(scales[k])
        pool = graph.pool()
        graphs.append(graph)
    for t, k in enumerate(order, start=4):
        graphed.feed(t)
        graphs[k].replay()
    torch.cuda.synchronize()
    _assert_identical(eager.snapshot(), graphed.snapshot())
    assert [int(g["schedule_step"]) for g in graphed.opt.param_groups] == [10, 10]


@pytest.mark.parametrize("backend", KERNELS)
def test_after_a_whole_iteration_capture_changes_it_would_not_see_raise(backend):
    loop = Loop(CASES[0], backend)
    graph, _ = loop.graphed()
    with pytest.raises(uf.CaptureError, match="Setting a param group's 'lr'"):
        torch.optim.lr_scheduler.LambdaLR(loop.opt, lambda t: 0.5 ** t).step()
    with pytest.raises(uf.CaptureError, match="add_param_group"):
        loop.opt.add_param_group({"params": [torch.zeros(3, device="cuda", requires_grad=True)]})
    graph.replay()  # still replays
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", KERNELS)
def test_capture_before_any_eager_step_raises_naming_the_rule(backend):
    loop = Loop(CASES[0], backend)
    loop.feed(0)
    loss = sum(((p * x) ** 2).sum() for p, x in zip(loop.params[:3], loop.static[:3]))
    loss.backward()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(uf.CaptureError, match="have no state yet"):
        with torch.cuda.stream(stream), torch.cuda.graph(graph):  # step() raises before it enqueues anything
            loop.opt.step()
    assert len(loop.opt.state) == 0


@pytest.mark.parametrize("backend", KERNELS)
def test_reduce_overhead_compile_of_a_train_step_matches_eager(backend):
    """torch.compile(train_step, fullgraph=True, mode="reduce-overhead"): forward, backward, the step (the op
    uba_fused::step) and zero_grad in one graph, which Inductor's CUDA graphs replay (none skipped). Bit for bit the
    same compile without CUDA graphs (the same kernels: parameters, state, counters and lrs), and within the rounding
    of Inductor's fused forward and backward of the eager loop."""
    from torch._dynamo.utils import counters
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace loss.backward() into a graph (trace_autograd_ops)")
    torch._dynamo.reset()
    counters.clear()
    try:
        runs = []
        for mode in (None, "default", "reduce-overhead"):
            loop = Loop(CASES[0], backend, seed=1)

            def train_step(loop=loop):
                loss = sum(((p.float() * x) ** 2).sum() for p, x in zip(loop.params, loop.static)
                           if p is not loop.frozen)
                loss.backward()
                loop.opt.step()
                loop.opt.zero_grad(set_to_none=True)
                return loss.detach()

            step = train_step if mode is None else torch.compile(train_step, mode=mode, fullgraph=True)
            losses = []
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                for t in range(STEPS):
                    loop.feed(t)
                    losses.append((train_step if t == 0 else step)().clone())  # (the first makes the state)
            torch.cuda.synchronize()
            runs.append((loop, losses))
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        (a, la), (b, lb), (c, lc) = runs
        _assert_identical(b.snapshot(), c.snapshot())
        assert all(torch.equal(x, y) for x, y in zip(lb, lc))
        # An update skipped or applied twice moves the loss by percents (lr 3e-2); inductor's reordered sums, by
        # about 1e-7; a bf16 parameter may round one ulp (2^-7 near 1) the other way.
        torch.testing.assert_close(torch.stack(lc), torch.stack(la), rtol=1e-4, atol=0)
        for p, q in zip(a.params, c.params):
            tol = dict(rtol=1e-5, atol=1e-6) if p.dtype == torch.float32 else dict(rtol=0, atol=1e-2)
            torch.testing.assert_close(q, p, **tol)
        assert [int(g["schedule_step"]) for g in c.opt.param_groups] == [STEPS, STEPS]
    finally:
        torch._dynamo.reset()


def _step_paths(opt, params, gen):
    """One step down every path of step(): first (builds), gradients moved, unchanged, one missing (the
    full path), a host lr changed (rows uploaded), and a tensor lr."""
    def grads(missing=None):
        for i, p in enumerate(params):
            p.grad = None if i == missing else torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype)

    yield grads()
    yield grads()
    yield None  # the same tensors again
    yield grads(missing=1)
    opt.param_groups[0]["lr"] *= 0.5
    yield grads()


@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["no-clip", "clip"])
@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_no_pageable_copy_and_no_sync_on_any_path_of_step(backend, clip):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, generator=gen, device="cuda").requires_grad_() for s in [(4099,), (16, 3), (1,)]]
    opt = uf.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": torch.tensor(0.01, device="cuda")}],
                   backend=backend, schedule=uf.UBA(100), max_grad_norm=clip)
    paths = _step_paths(opt, params, gen)
    next(paths)
    opt.step()  # the first step builds the tables; it may copy from the host, from pinned memory
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in paths:
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    pageable = [e.name for e in prof.events() if "Pageable" in e.name]
    assert not pageable, f"step() copied from pageable host memory: {pageable}"


def _cuda_params(seed, shapes=((4099,), (16, 3), (1,), (3 * 4096,)), dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, generator=gen, device="cuda").to(dtype).requires_grad_() for s in shapes]


def _device_grads(params, n, seed):
    """n sets of fresh gradients, made on the device (a pageable copy from the host would wait for the stream)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype) for p in params] for _ in range(n)]


@pytest.mark.parametrize("backend", KERNELS)
def test_one_host_to_device_copy_per_step_when_gradients_moved_and_none_when_not(backend):
    """The gradients' addresses reach the device in one pinned copy per step, only when some moved; clipping
    adds none."""
    params = _cuda_params(1)
    opt = uf.AdamW(params, backend=backend, schedule=uf.UBA(100), max_grad_norm=1.0)
    grads = _device_grads(params, 5, seed=2)
    set_grads(params, grads[0])
    opt.step()
    torch.cuda.synchronize()

    def copies(steps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            steps()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if "Memcpy HtoD" in e.name]

    def moved():
        for gs in grads[1:4]:
            set_grads(params, gs)  # new tensors, new addresses
            opt.step()

    def unchanged():
        for _ in range(3):
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(0.5)  # the same tensors, refilled in place
            opt.step()

    moved_copies = copies(moved)
    assert len(moved_copies) == 3 and all("Pinned" in name for name in moved_copies), moved_copies
    assert copies(unchanged) == []


@pytest.mark.parametrize("backend", KERNELS)
def test_steps_enqueued_behind_a_stalled_stream_compute_what_eager_steps_compute(backend):
    """The host runs ahead of the GPU by six steps, each with fresh gradients (whose memory the caching allocator
    hands on from step to step): the results once the stream drains are backend "torch"'s."""
    a, b = _cuda_params(3), _cuda_params(3)
    opt_a = uf.AdamW(a, backend="torch", schedule=uf.UBA(20, warmup_steps=2), max_grad_norm=5.0)
    opt_b = uf.AdamW(b, backend=backend, schedule=uf.UBA(20, warmup_steps=2), max_grad_norm=5.0)
    gen = torch.Generator(device="cuda").manual_seed(4)
    set_grads(b, [torch.randn(p.shape, generator=gen, device="cuda") for p in b])
    opt_b.step()
    first = [p.grad.clone() for p in b]
    torch.cuda.synchronize()
    busy = torch.cuda.Event()
    torch.cuda._sleep(1_000_000_000)
    busy.record()
    taken = []
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen, device="cuda") for p in b]
        taken.append([g.clone() for g in grads])
        set_grads(b, grads)
        opt_b.step()
        del grads
    assert not busy.query(), "step() waited for the GPU"
    torch.cuda.synchronize()
    for gs in [first] + taken:
        set_grads(a, gs)
        opt_a.step()
    assert_same_runs(a, b, opt_a, opt_b)


@pytest.mark.parametrize("backend", KERNELS)
def test_steps_on_two_streams_run_in_order_and_leave_the_counters_at_zero(backend):
    """Steps alternating between two streams, one of them stalled before each of its steps: the optimizer
    orders each step after the last one's stream, so they apply in program order (as backend "torch" computes
    them one after another) and the kernels' counters end at zero."""
    a, b = _cuda_params(5), _cuda_params(5)
    opt_a = uf.AdamW(a, backend="torch", schedule=uf.Cosine(10))
    opt_b = uf.AdamW(b, backend=backend, schedule=uf.Cosine(10))
    grads = _device_grads(b, 7, seed=6)
    set_grads(b, grads[0])
    opt_b.step()
    torch.cuda.synchronize()
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    for t, gs in enumerate(grads[1:]):
        with torch.cuda.stream(streams[t % 2]):
            if t % 2 == 0:
                torch.cuda._sleep(100_000_000)
            set_grads(b, gs)
            opt_b.step()
    torch.cuda.synchronize()
    for gs in grads:
        set_grads(a, gs)
        opt_a.step()
    assert_same_runs(a, b, opt_a, opt_b)
    plan = opt_b._cache.plans[backend]
    assert all(int(part.done.abs().sum()) == 0 for part in plan.parts)
    assert int(opt_b.param_groups[0]["schedule_step"]) == 7


@pytest.mark.parametrize("backend", KERNELS)
def test_tables_made_on_a_side_stream_are_not_reused_while_another_stream_may_read_them(backend):
    """Tables built during a side-stream warm-up, read by a step on the main stream that is still queued behind a
    stalled kernel, then dropped (a rebuild): the caching allocator must not hand their memory to the side
    stream before the main stream's step ran (record_stream)."""
    params = _cuda_params(7)
    opt = uf.AdamW(params, backend=backend, schedule=uf.UBA(100))
    grads = _device_grads(params, 3, seed=8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in grads[:2]:
            set_grads(params, gs)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    plan = opt._cache.plans[backend]
    tables = [plan.groups, plan.gaddr, plan.grads, plan.scratch, plan.partials]
    tables += [t for part in plan.parts for t in (part.tensors, part.work, part.done)]
    sizes = [(t.numel(), t.dtype) for t in tables]
    addresses = {t.data_ptr() for t in tables}
    torch.cuda._sleep(500_000_000)
    set_grads(params, grads[2])
    opt.step()  # queued on the main stream behind the sleep, reading the side stream's tables
    del plan, tables
    opt._cache.clear()  # as a rebuild drops them
    with torch.cuda.stream(side):
        fresh = [torch.empty(n, dtype=d, device="cuda") for n, d in sizes]
    reused = addresses & {f.data_ptr() for f in fresh}
    torch.cuda.synchronize()
    assert not reused, f"{len(reused)} tables handed on while a queued kernel could still read them"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
@pytest.mark.parametrize("backend", KERNELS)
def test_parameters_on_another_device_than_the_current_one(backend):
    """Parameters on cuda:1 while cuda:0 is current: the kernels run on cuda:1, on its current stream, and a
    capture there is seen as one."""
    with torch.cuda.device(1):
        a, b = _cuda_params(9), _cuda_params(9)
    opt_a = uf.AdamW(a, backend="torch", max_grad_norm=1.0)
    opt_b = uf.AdamW(b, backend=backend, max_grad_norm=1.0)
    with torch.cuda.device(1):
        grads = _device_grads(b, 3, seed=10)
    assert torch.cuda.current_device() == 0
    for gs in grads:
        set_grads(a, gs)
        set_grads(b, gs)
        opt_a.step()
        opt_b.step()
    torch.cuda.synchronize(1)
    assert_same_runs(a, b, opt_a, opt_b)
    assert backends.capturing([torch.device("cuda", 1)]) is False
