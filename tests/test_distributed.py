"""DDP and FSDP2 (DTensor) parameters: parity with one process, checkpoints across rank counts, errors.

The multi-rank tests start every rank of ``tests/distributed_worker.py`` as its own process over gloo
on the CPU, each backend in its CPU test mode, and fail (killing the rest) when a rank fails or no rank has
made progress for a while (a hang). Each rank writes a line to its log after every optimizer step, so a run
on a loaded machine, slow but moving, is never taken for a hang. Three runs chain: 2 ranks (FSDP2, DDP and tensor
parallelism, saving a checkpoint), then 1 rank (FSDP2, loading the 2-rank checkpoint and saving its own), then 2
ranks (loading the 1-rank one). A fourth, on 4 ranks, runs FSDP2 beside tensor parallelism on a 2-D mesh. The
single-rank tests below build DTensors on a one-rank mesh in this process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import uba_fused as uf

import distributed_worker as worker

WORKER = pathlib.Path(worker.__file__)
# A run is hung when no rank's log grew for this long. The three CPU runs took 178 s in all on an idle 2-core
# machine (160 s before the 8-bit case; 2026-12-04), with at most a few seconds between two steps (checkpoint I/O, the first Triton compile of a
# kernel); on a loaded machine that took every run past a fixed 300 s limit, they still write a line every
# few seconds.
STALL_S = 180
NAMES = [f"{case}-{backend}" for case in worker.CASES for backend in worker.BACKENDS[case]]
TP_NAMES = [f"{case}-{backend}" for case in worker.TP_CASES for backend in worker.TP_BACKENDS]
TP_2D_NAMES = [f"{case}-{backend}" for case in worker.TP_CASES for backend in worker.TP_2D_BACKENDS]
# How far a multi-rank run may end from the one-process run, relative to each tensor's largest value.
# The collective averages the ranks' gradients in another order than one process's batch mean, a few
# fp32 ulps per step, which 12 steps of momentum carry (measured: at most 2.3e-6). A wrong shard or a lost
# step moves a value by about lr per step, 1e-3 and more; the lr of a neighbouring step, by 1e-4.
REL = 1e-5


def launch(tmp: pathlib.Path, world: int, *args: str, device: str = "cpu", script: pathlib.Path = WORKER,
           stall_s: float = STALL_S) -> list[dict]:
    """Run the worker (or ``script``) on ``world`` ranks; each rank's results."""
    out = tmp / f"out-{time.monotonic_ns()}"
    out.mkdir()
    env = {**os.environ, "WORLD_SIZE": str(world), "UBA_FUSED_DIST_DEVICE": device}
    if device == "cpu":
        env.update(TRITON_INTERPRET="1", UBA_FUSED_CUDA_ON_CPU="1", CUDA_VISIBLE_DEVICES="")
    logs = [out / f"rank{r}.log" for r in range(world)]
    files = [log.open("w") for log in logs]
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(out / "store"), *args],
                              env={**env, "RANK": str(r)}, stdout=f, stderr=subprocess.STDOUT)
             for r, f in enumerate(files)]
    progress, last = None, time.monotonic()
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            sizes = [log.stat().st_size for log in logs]
            if sizes != progress:
                progress, last = sizes, time.monotonic()
            if failed or time.monotonic() - last > stall_s:
                why = f"rank {failed[0]} exited with {procs[failed[0]].returncode}" if failed else \
                    f"no rank made progress for {stall_s} s (a hang)"
                tails = "\n".join(f"--- rank {r}:\n{log.read_text()[-3000:]}" for r, log in enumerate(logs))
                pytest.fail(f"{world}-rank run {' '.join(args)}: {why}\n{tails}")
            time.sleep(0.2)
    finally:
        for p, f in zip(procs, files):
            p.kill()
            p.wait()
            f.close()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r].read_text()[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


_PACED = """
import json, pathlib, sys, time
out, rank = pathlib.Path(sys.argv[1]), int(__import__("os").environ["RANK"])
for i in range(int(sys.argv[3])):
    print("step", i, flush=True)
    time.sleep(float(sys.argv[4]))
if sys.argv[5] == "hang":
    time.sleep(3600)
(out / f"rank{rank}.json").write_text(json.dumps({"rank": rank}))
"""


def test_a_slow_run_that_progresses_passes_and_a_silent_one_is_a_hang(tmp_path):
    """The hang detector watches progress, not the clock: a run of 6 steps of 0.5 s passes with a 1.5 s stall
    limit; one that stops writing is failed about that long after its last line."""
    script = tmp_path / "paced.py"
    script.write_text(_PACED)
    assert launch(tmp_path, 2, "6", "0.5", "finish", script=script, stall_s=1.5) == [{"rank": 0}, {"rank": 1}]
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"no rank made progress for 1.5 s \(a hang\)"):
        launch(tmp_path, 2, "2", "0.1", "hang", script=script, stall_s=1.5)
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("distributed")
    two = launch(tmp, 2, "--fsdp2", "--ddp", "--tp", "--save", str(tmp / "ckpt-2"))
    one = launch(tmp, 1, "--fsdp2", "--save", str(tmp / "ckpt-1"), "--load", str(tmp / "ckpt-2"))
    two_again = launch(tmp, 2, "--load", str(tmp / "ckpt-1"))
    return {"2 ranks": two, "1 rank": one, "2 ranks from 1": two_again}


def assert_like_one_process(ranks: list[dict], key: str) -> None:
    """As the one-process run within REL; bit for bit for 8-bit state, where every rank trains on the full batch."""
    for r, res in enumerate(ranks):
        got = res[key]
        where = f"{key} on rank {r} of {len(ranks)}"
        assert got["rel"] <= REL, f"{where}: ends {got['rel']:.2e} (relative) from the one-process run"
        if "8bit" in key:
            assert got["equal"], f"{where}: not bit for bit the one-process run (within {got['rel']:.2e})"
        assert got["steps_equal"], f"{where}: a parameter's step count differs from the one-process run"
        assert got["schedule_step"] == got["ref_schedule_step"] == [worker.STEPS], where
        assert got["lr"] == got["ref_lr"], f"{where}: applied lr {got['lr']}, one process {got['ref_lr']}"
        assert got["backends"] == [key.split("-")[-1]], where
        if "table" in key or key.startswith("tp/"):  # (these record their gradient norms: a NaN, one not recorded)
            assert got["norms_rel"] <= REL, f"{where}: recorded norms {got['norms_rel']:.2e} from one process's"


@pytest.mark.parametrize("world", ["2 ranks", "1 rank"])
def test_clipping_refuses_dtensor_parameters_beside_plain_ones(runs, world):
    # (adamw-clip, in every run below, clips sharded parameters by the norm summed over the ranks)
    for res in runs[world]:
        assert "parameters [6] (in the optimizer's order) are not DTensors" in res["fsdp2/clip-mixed"], \
            res["fsdp2/clip-mixed"]
        assert res["fsdp2/clip-mixed-left-no-state"]


@pytest.mark.parametrize("name", [n for n in NAMES if "8bit" not in n])
def test_ddp_matches_one_process_on_the_full_batch(runs, name):
    assert_like_one_process(runs["2 ranks"], f"ddp/{name}")


@pytest.mark.parametrize("world", ["2 ranks", "1 rank"])
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_uneven_and_empty_shards_match_one_process(runs, name, world):
    assert_like_one_process(runs[world], f"fsdp2/{name}")


@pytest.mark.parametrize("world", ["2 ranks", "1 rank"])
@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("adamw")])
def test_hsdp_replicate_and_shard_placements_match_one_process(runs, name, world):
    assert_like_one_process(runs[world], f"hsdp/{name}")


@pytest.mark.parametrize("name", TP_NAMES)
def test_tensor_parallel_sums_each_tensor_over_the_ranks_that_shard_it(runs, name):
    """Parameters placed Shard(0), Shard(1) and Replicate() on one mesh (tensor parallelism, every rank on the full
    batch): clipping's norm and the rules' per-tensor sums add each tensor's shares over the ranks that shard it and
    count a replicated one once. Summing the replicated rows too moved these runs by 0.21-0.73 (relative; LARS's
    ratio does not see it), summing none by 0.21-0.30 (2026-12-05)."""
    assert_like_one_process(runs["2 ranks"], f"tp/{name}")


@pytest.fixture(scope="module")
def tp_2d(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("tp-2d"), 4, "--tp")


@pytest.mark.parametrize("name", TP_2D_NAMES)
def test_fsdp2_beside_tensor_parallelism_sums_each_tensor_over_the_ranks_that_shard_it(tp_2d, name):
    """torchtitan's 2-D layout on 4 ranks: FSDP2 over dp = 2 beside TP over tp = 2, parameters placed
    (_StridedShard(0), Shard(0)), (Shard(0), Shard(1)) and (Shard(0), Replicate()), each dp pair on its slice of the
    batch. _StridedShard (FSDP2's over TP's Shard(0)) is no Shard to is_shard(): counting only those left its tensors
    unsummed over dp, 0.06-0.44 from one process (2026-12-05)."""
    assert_like_one_process(tp_2d, f"tp/{name}")


@pytest.mark.parametrize("where", ["fsdp2/norm-test", "tp/norm-test", "ddp/norm-test"])
def test_norm_test_sums_each_tensors_shards_over_the_ranks(runs, tp_2d, where):
    """uf.NormTest (AdAdaGrad's norm test) on DTensor parameters: under FSDP2 (each rank its slice of each
    micro-batch, the gradients reduce-scattered) and under tensor parallelism (Shard(0), Shard(1), Replicate(); on 4
    ranks beside FSDP2), every rank's variance, squared norm and answer are the one process's, and the mean gradient
    it writes is placed as its parameter. Under DDP on 2 ranks (plain parameters, each micro-batch's gradient
    all-reduced by its backward), the same."""
    ranks = runs["2 ranks"] + {"fsdp2": runs["1 rank"], "tp": tp_2d, "ddp": []}[where.split("/")[0]]
    for r, res in enumerate(ranks):
        got = res[where]
        assert got["answers"][0] == got["answers"][1] and got["answers"][0] > 3, (r, got)  # (eta 0.2: it grows)
        assert got["variance_rel"] <= REL and got["norm_sq_rel"] <= REL and got["grad_rel"] <= REL, (r, got)
        assert got["placed"], (r, got)


def test_tensor_parallel_adamp_refuses_rows_across_ranks_before_any_change(runs, tp_2d):
    for res in runs["2 ranks"]:
        assert "sharded by rows only (FSDP2's Shard(0)), got placements (Shard(dim=1),)" in res["tp/adamp"], \
            res["tp/adamp"]
        assert res["tp/adamp-left-no-state"]
    for res in tp_2d:
        assert "got placements (Shard(dim=0), Shard(dim=1))" in res["tp/adamp"] and res["tp/adamp-left-no-state"]


@pytest.mark.parametrize("world", ["2 ranks", "1 rank"])
@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("adamw")])
def test_fsdp2_full_state_dict_round_trip_continues_as_if_uninterrupted(runs, name, world):
    """get_state_dict(full_state_dict=True) gathers the DTensor state into plain tensors; set_state_dict
    shards them back onto a fresh optimizer's DTensors."""
    assert_like_one_process(runs[world], f"full/{name}")


@pytest.mark.parametrize("direction", ["1 rank", "2 ranks from 1"], ids=["saved-on-2-loaded-on-1", "1-to-2"])
@pytest.mark.parametrize("name", NAMES)
def test_dcp_checkpoint_resharded_continues_as_if_uninterrupted(runs, name, direction):
    assert_like_one_process(runs[direction], f"dcp/{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp2_on_one_gpu_over_nccl(tmp_path):
    """Every backend natively, under FSDP2 on a one-rank NCCL mesh, against one process on the GPU."""
    (res,) = launch(tmp_path, 1, "--fsdp2", "--ddp", device="cuda")
    for name in NAMES:
        assert_like_one_process([res], f"fsdp2/{name}")
        if "8bit" not in name:  # (the worker runs 8-bit state under FSDP2 only)
            assert_like_one_process([res], f"ddp/{name}")


# -- one rank, in this process --------------------------------------------------------------------------
# On CPU tensors: a kernel backend runs here in its CPU test mode, which conftest sets where there is no
# GPU (on a GPU machine the worker processes above still run every backend that way).
_CPU = uf.backends.availability("cpu")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(_CPU[b] is not None, reason=f"{b} on CPU: {_CPU[b]}"))
            for b in ("torch", "triton", "cuda")]


@pytest.fixture(scope="module")
def mesh():
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if ours:
        dist.destroy_process_group()


def dtensor_params(mesh, placements, seed=0):
    """A DTensor parameter of each placement, and a plain one beside them."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(DTensor.from_local(torch.randn(6, 5, generator=gen), mesh, [pl])) for pl in placements]
    return ps + [torch.nn.Parameter(torch.randn(7, generator=gen))]


def give_grads(params, gen):
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        p.grad = DTensor.from_local(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_placements_update_their_local_shards(mesh, backend):
    """Shard(0), Shard(1), Replicate: the same values as plain tensors, the state kept as DTensors placed
    like their parameter; and when FSDP2 gives a parameter a new local tensor, the new one is updated."""
    placements = [Shard(0), Shard(1), Replicate()]
    ps = dtensor_params(mesh, placements)
    plain = [torch.nn.Parameter(p.to_local().clone() if isinstance(p, DTensor) else p.detach().clone()) for p in ps]
    opts = [uf.AdamW(x, lr=1e-2, weight_decay=0.1, schedule=uf.UBA(8, warmup_steps=2), backend=backend)
            for x in (ps, plain)]
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in range(6):
        if t == 3:  # what FSDP2's reset_sharded_param does after a model state-dict load
            ps[0]._local_tensor = ps[0]._local_tensor.clone()
        give_grads(ps, gen_a)
        give_grads(plain, gen_b)
        for opt in opts:
            opt.step()
    for i, (p, q) in enumerate(zip(ps, plain)):
        torch.testing.assert_close(p.to_local() if isinstance(p, DTensor) else p.detach(), q.detach(), rtol=0,
                                   atol=0, msg=lambda m: f"param {i}: {m}")
        for k in ("exp_avg", "exp_avg_sq"):
            s = opts[0].state[p][k]
            if isinstance(p, DTensor):
                assert isinstance(s, DTensor) and s.placements == p.placements, f"state {k} of param {i}"
                s = s.to_local()
            torch.testing.assert_close(s, opts[1].state[q][k], rtol=0, atol=0)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpu"])
def test_placed_several_ways_clipping_and_per_tensor_norms_equal_plain_tensors(mesh, backend):
    """LAMB (clipping at 1.0, per-tensor norms) over DTensors placed Shard(0), Shard(1) and Replicate(): the sums come
    per tensor, each all-reduced over its own class's groups (identity on one rank), and the run equals one of plain
    tensors to float32 rounding (the global norm is added in another order). Placed several ways, this raised before
    2026-12-05."""
    gen = torch.Generator().manual_seed(7)
    ps = [torch.nn.Parameter(DTensor.from_local(torch.randn(6, 5, generator=gen), mesh, [pl]))
          for pl in (Shard(0), Shard(1), Replicate())]
    plain = [torch.nn.Parameter(p.to_local().clone()) for p in ps]
    opts = [uf.LAMB(x, lr=1e-2, weight_decay=0.1, schedule=uf.UBA(8, warmup_steps=2), backend=backend)
            for x in (ps, plain)]
    assert opts[0].param_groups[0]["max_grad_norm"] == 1.0
    for t in range(4):
        grads = [torch.randn(6, 5, generator=gen) * 3 for _ in ps]  # norms of about 15: every step clips
        for p, q, g in zip(ps, plain, grads):
            p.grad = DTensor.from_local(g.clone(), mesh, p.placements)
            q.grad = g
        for opt in opts:
            opt.step()
    assert uf.backends.shards.per_row(opts[0]._cache.layout[0])
    for i, (p, q) in enumerate(zip(ps, plain)):
        torch.testing.assert_close(p.to_local(), q.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")


def test_partial_parameter_is_refused(mesh):
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"params\[0\] is a DTensor with placements .*Partial"):
        uf.AdamW([p])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_placed_unlike_its_parameter_is_refused_before_any_change(mesh, backend):
    ps = dtensor_params(mesh, [Shard(0)])
    opt = uf.AdamW(ps, lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(2)
    give_grads(ps, gen)
    opt.step()
    before = [p.to_local().clone() if isinstance(p, DTensor) else p.detach().clone() for p in ps]
    state = {k: v.to_local().clone() for k, v in opt.state[ps[0]].items() if k != "step"}
    give_grads(ps, gen)
    ps[0].grad = DTensor.from_local(ps[0].grad.to_local(), mesh, [Replicate()])  # same local shape, wrong place
    with pytest.raises(RuntimeError, match=r"params'\]\[0\]: its gradient is placed .*Replicate.*Shard"):
        opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p.to_local() if isinstance(p, DTensor) else p.detach(), b)
    for k, v in state.items():
        assert torch.equal(opt.state[ps[0]][k].to_local(), v), k
    assert int(opt.param_groups[0]["schedule_step"]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_gradient_of_a_plain_parameter_is_refused_before_any_change(mesh, backend):
    """autograd lets a plain parameter take a DTensor as .grad; its address is not its values' (the kernels
    crashed on it), so the C++ pass refuses it and the check names it."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(6, generator=gen))
    opt = uf.AdamW([p], lr=1e-2, backend=backend)
    p.grad = torch.randn(6, generator=gen)
    opt.step()  # state made, and the C++ pass has a reference: the next step tries the steady path first
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = DTensor.from_local(torch.randn(6, generator=gen), mesh, [Shard(0)])
    with pytest.raises(RuntimeError, match=r"params'\]\[0\]: its gradient is placed .*Shard.*, the parameter not a "
                                           r"DTensor"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_state_placed_unlike_its_parameter_is_refused(mesh):
    ps = dtensor_params(mesh, [Shard(0)])
    plain = [torch.nn.Parameter(p.to_local().clone() if isinstance(p, DTensor) else p.detach().clone()) for p in ps]
    opts = [uf.AdamW(x, backend="torch") for x in (ps, plain)]
    gen = torch.Generator().manual_seed(3)
    for x, opt in zip((ps, plain), opts):
        give_grads(x, gen)
        opt.step()
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] is placed not a DTensor, its parameter .*Shard"
                                         r".*set_optimizer_state_dict"):
        opts[0].load_state_dict(opts[1].state_dict())
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] is placed .*Shard.*, its parameter not a DTensor"):
        opts[1].load_state_dict(opts[0].state_dict())


class _MLP(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.skipif(not hasattr(getattr(uf._ext, "_C", None), "GradAddresses"), reason="needs uba_fused._C")
def test_fsdp2_gradients_take_the_c_pass_and_a_moved_shard_is_seen(mesh, backend, monkeypatch):
    """FSDP2 gives each gradient its parameter's own DTensorSpec: from the second step on, step() finds the
    local shards with the C++ pass of plain tensors, and stays equal to a plain model's run. When FSDP2
    gives a parameter a new local tensor, the step sees it and updates the new one."""
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(4)
    plain = _MLP()
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    sharded = _MLP()
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded, mesh=mesh)
    opts = [uf.AdamW(m.parameters(), lr=1e-2, schedule=uf.UBA(10), backend=backend) for m in (plain, sharded)]
    taken, steady = [], uf.backends.step._steady_work

    def spy(opt, capture):  # whether each step of the sharded one took the C++ path
        work, grads = steady(opt, capture)
        if opt is opts[1]:
            taken.append(work is not None)
        return work, grads

    monkeypatch.setattr(uf.backends.step, "_steady_work", spy)
    for t in range(6):
        x = torch.randn(8, 4, generator=gen)
        for m, opt in zip((plain, sharded), opts):
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        if t == 5:  # as FSDP2's reset_sharded_param does; forward read the old one, equal to it until now
            p0 = next(sharded.parameters())
            p0._local_tensor = p0._local_tensor.clone()
        for opt in opts:
            opt.step()
    assert taken == [False, True, True, True, True, False]
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.to_local(), q.detach(), msg=lambda m: f"{name}: {m}")
