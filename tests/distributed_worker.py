"""One rank of the distributed tests (tests/test_distributed.py starts every rank of a run).

    python tests/distributed_worker.py OUT STORE [--fsdp2 [--save DIR]] [--load DIR] [--ddp] [--tp]

For every case x backend (BACKENDS), a small MLP trains for ``STEPS`` steps: under FSDP2 with ``--fsdp2``
(``fully_shard`` on a mesh of all ranks; its layers of 5, 3 and 1 rows shard unevenly, and on 2 ranks
the last is empty on rank 1), saving a torch.distributed.checkpoint after ``SAVE_AT`` steps with
``--save``, and for AdamW also as HSDP (a 1 x ranks mesh) and through a full state dict; under FSDP2
from such a checkpoint, written on another number of ranks, with ``--load``; and under DDP with
``--ddp`` (with ``gradient_as_bucket_view`` for one rule); and under tensor parallelism with ``--tp``
(``tensor_parallel``: parameters placed three ways, for the rules that sum over tensors). Every rank draws the same
full batch each
step and trains on its slice (8-bit state: on all of it, and its model's first weight is 17 rows of 256,
sharded 9 and 8). Each rank also trains the model unsharded, in one process on the full batch, and
writes to OUT/rank<r>.json how far each run ends from that one (parameters and optimizer state), its
schedule counter and applied lr. The test compares.

Backends "triton" and "cuda" run in their CPU test modes (TRITON_INTERPRET=1, UBA_FUSED_CUDA_ON_CPU=1,
set by the test), over gloo; ``UBA_FUSED_DIST_DEVICE=cuda`` runs on this rank's GPU over NCCL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import uba_fused as uf

STEPS, SAVE_AT, BATCH = 12, 6, 16
# Two rules with different state (two buffers and a step-dependent bias correction; one buffer that
# starts as the first gradient), both under a UBA schedule whose warm-up and decay the 12 steps cross; and
# AdamW again, clipping by the global gradient norm.
CASES = {
    "adamw": lambda params, backend: uf.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1,
                                              schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend),
    # max_grad_norm 2.5 clips some steps (the unclipped run's norms are 1.9-5.5): sharded, each rank's share of
    # the sum of squares is all-reduced over the mesh's sharded dimension
    "adamw-clip": lambda params, backend: uf.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1,
                                                   schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend,
                                                   max_grad_norm=2.5),
    "sgd": lambda params, backend: uf.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01,
                                          schedule=uf.UBA(STEPS, phi=2.0, min_lr_ratio=0.1), backend=backend),
    # 8-bit state, rounded to nearest, of a wider model whose first weight (17 rows of 256: one block a row) keeps
    # it; every rank trains on the full batch, so that the gradients are exact and a run equals one process bit for
    # bit (8-bit codes amplify the last-bit differences of averaging other slices)
    "adamw-8bit": lambda params, backend: uf.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1,
                                                   schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend,
                                                   state_dtype=torch.int8, state_rounding="nearest"),
    # per-tensor norms (LARS's trust ratio): sharded, each rank's sums of squares of its shards are all-reduced per
    # tensor, or a rank would scale its rows by the ratio of its own shard
    "lars": lambda params, backend: uf.LARS(params, lr=0.5, momentum=0.9, weight_decay=0.01, trust_coeff=0.02,
                                            schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend),
    # per-tensor norms of the update's direction (LAMB's), with timm's global clipping at 1.0 (its default): both
    # sums cross shards
    "lamb": lambda params, backend: uf.LAMB(params, lr=2e-2, betas=(0.8, 0.95), weight_decay=0.05,
                                            schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend),
    # per-row sums (AdamP's projection): FSDP2 shards the rows (the last weight's one row leaves a rank none), the
    # rows' cosine test and the tensors' sums are all-reduced; delta 2 projects some of the tensors
    "adamp": lambda params, backend: uf.AdamP(params, lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05,
                                              delta=2.0, wd_ratio=0.3, nesterov=True,
                                              schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend),
    # a Table schedule (UBA's, tabulated): every rank reads the same table on its device; checkpoints carry it; and
    # a history of the L2 gradient norms (record_grad_norms): each rank's share summed over the mesh, carried too
    "sgd-table": lambda params, backend: _with_table(uf.SGD, list(params), backend, lr=5e-2, momentum=0.9,
                                                     weight_decay=0.01),
    # per-tensor moments at the first step (SGD-SaI's g-SNR): sharded, each rank's sums of its shards are all-reduced
    # per tensor, or a rank would scale its rows by the g-SNR of its own shard. eps 0.1: the last bias has one element
    # (std 0, g-SNR |g| / eps), and at eps 1e-6 every run, one process's too, went to inf within the 12 steps
    "sgd_sai": lambda params, backend: uf.SGDSaI(params, lr=5e-2, momentum=0.9, eps=0.1, weight_decay=0.01,
                                                 schedule=uf.UBA(STEPS, phi=0.5, warmup_steps=2), backend=backend),
}
def _with_table(cls, params: list, backend: str, **options):
    table = uf.Table.of(uf.UBA(STEPS, phi=0.5, warmup_steps=2), STEPS + 1, params[0].device)
    opt = cls(params, schedule=table, backend=backend, **options)
    opt.record_grad_norms(STEPS)
    return opt


WIDTHS = {"adamw-8bit": (256, 17, 1)}  # the layers' widths of a case's model: (6, 5, 3, 1) where not listed
# The backends each case runs on. 8-bit state on Triton's interpreter took the three runs from about 100 to 200 s;
# what DTensors change (the state's placements, the scales' rows; LARS's, LAMB's and AdamP's sums over shards) is the
# same Python for every backend.
BACKENDS = {case: ("torch", "cuda") if case in ("adamw-8bit", "lars", "lamb", "adamp", "sgd_sai", "sgd-table")
            else ("torch", "triton", "cuda")
            for case in CASES}
# Tensor parallelism (--tp): parameters placed three ways on one mesh (Shard(0), Shard(1), Replicate()), so that each
# tensor's sums (clipping's norm, the rules' per-tensor ones) cover the ranks that shard it and no others. Even widths:
# the first layer's 4 rows and the second's 4 columns split in halves.
TP_CASES = ("adamw-clip", "lars", "lamb", "sgd_sai")
TP_BACKENDS = ("torch", "cpu", "cuda")
TP_2D_BACKENDS = ("torch", "cuda")  # (4 processes on CI's 2 cores: 31 s with the three, 21 with these)
TP_WIDTHS = (6, 4, 2, 1)


def make_model(device: torch.device, widths: tuple[int, ...] = (6, 5, 3, 1)) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    layers = [m for a, b in zip(widths, widths[1:]) for m in (torch.nn.Linear(a, b), torch.nn.Tanh())]
    model = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 * min(1.0, (6 / p.shape[-1]) ** 0.5))  # tanh unsaturated
    return model.to(device)


def batch(t: int, device: torch.device, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of step t, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(BATCH, width, generator=gen)
    return x.to(device), (x[:, :1] * x[:, 1:2] + 0.1 * torch.randn(BATCH, 1, generator=gen)).to(device)


def train(model, opt, steps: range, rank: int, world: int, device: torch.device, save: pathlib.Path | None = None,
          whole: bool = False):
    """``whole``: every rank trains on the full batch, not its slice of it."""
    share = BATCH if whole else BATCH // world
    rank = 0 if whole else rank
    for t in steps:
        x, y = batch(t, device, next(iter(model.parameters())).shape[-1])  # the first weight: [out, in]
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {t}", flush=True)  # progress, which the test's hang detector watches
        if save is not None and t + 1 == SAVE_AT:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=save)


def sharded(make, backend: str, mesh, device: torch.device, widths: tuple[int, ...]):
    """The model under FSDP2, each Linear its own unit, and its optimizer."""
    model = make_model(device, widths)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, make(model.parameters(), backend)


def tensor_parallel(make, backend: str, mesh, device: torch.device, dp_mesh=None):
    """The model of TP_WIDTHS under tensor parallelism on ``mesh``, as Megatron splits an MLP (ColwiseParallel: the
    first layer's rows and bias, Shard(0); RowwiseParallel: the second's columns, Shard(1), its bias replicated), its
    last layer replicated; with ``dp_mesh``, then under FSDP2 on it, as torchtitan lays a model out (placements
    (_StridedShard(0), Shard(0)), (Shard(0), Shard(1)) and (Shard(0), Replicate())); and its optimizer."""
    from torch.distributed.tensor import DTensor, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = make_model(device, TP_WIDTHS)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    distribute_module(model[4], mesh, input_fn=lambda m, xs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()])
                                                                          for x in xs),
                      output_fn=lambda m, y, mesh: y.to_local())
    tp = [(Shard(0),), (Shard(0),), (Shard(1),), (Replicate(),), (Replicate(),), (Replicate(),)]
    if dp_mesh is not None:
        fully_shard(model, mesh=dp_mesh)
        tp = [(pl[1],) for pl in (p.placements for p in model.parameters())]
    assert [p.placements[-1:] for p in model.parameters()] == tp
    return model, make(model.parameters(), backend)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def distance(model, opt, ref_model, ref_opt) -> dict:
    """How far a run ends from the unsharded one: the largest difference of a parameter or state buffer
    relative to the largest magnitude of that tensor, whether every one is equal bit for bit (8-bit codes and
    their scales included) and every per-parameter step count the same, and the counters this rank keeps."""
    rel, equal, steps_equal = 0.0, True, True
    for p, q in zip(model.parameters(), ref_model.parameters()):
        pairs = [(full(p.detach()), q.detach())]
        pairs += [(full(v), ref_opt.state[q][k]) for k, v in opt.state[p].items() if k != "step"]
        for a, b in pairs:
            a, b = a.cpu(), b.cpu()
            equal &= a.dtype == b.dtype and torch.equal(a, b)
            finite = bool(torch.isfinite(a.double()).all() and torch.isfinite(b.double()).all())
            # (a run gone to inf or NaN is no parity: max() would pass over a NaN)
            rel = max(rel, ((a.double() - b.double()).abs().max() / b.double().abs().max()).item() if finite
                      else math.inf)
        steps_equal &= bool(opt.state[p]["step"].cpu() == ref_opt.state[q]["step"].cpu())
    norms = None  # the recorded gradient norms (record_grad_norms), as far from the one process's, relative
    if ref_opt.grad_norms is not None:
        a, b = opt.grad_norms.double().cpu(), ref_opt.grad_norms.double().cpu()
        norms = ((a - b).abs() / b).max().item() if not b.isnan().any() else math.nan
    return dict(rel=rel, equal=equal, steps_equal=steps_equal, norms_rel=norms,
                schedule_step=[int(g["schedule_step"]) for g in opt.param_groups],
                ref_schedule_step=[int(g["schedule_step"]) for g in ref_opt.param_groups],
                lr=[float(x) for x in opt.get_last_lr()], ref_lr=[float(x) for x in ref_opt.get_last_lr()],
                backends=opt.backends)


def norm_test(model, ref_model, rank: int, world: int, device: torch.device, whole: bool = False) -> dict:
    """uf.NormTest over 3 micro-batches of step 0's batch (each rank its slice of each, or the whole with ``whole``)
    against the same on the unsharded model on one process's full micro-batches: its statistics, relative to the one
    process's, its answer, and the mean gradient it writes (as far from the one process's, relative)."""
    tests = [uf.NormTest(model.parameters(), eta=0.2), uf.NormTest(ref_model.parameters(), eta=0.2)]
    x, y = batch(0, device, next(iter(model.parameters())).shape[-1])
    micro = BATCH // 2
    for k in range(3):  # (micro-batches overlap: 3 of BATCH / 2 samples)
        xs, ys = x[k * micro // 2:k * micro // 2 + micro], y[k * micro // 2:k * micro // 2 + micro]
        share, at = (micro, 0) if whole else (micro // world, rank)
        torch.nn.functional.mse_loss(model(xs[at * share:(at + 1) * share]), ys[at * share:(at + 1) * share]).backward()
        tests[0].accumulate()
        torch.nn.functional.mse_loss(ref_model(xs), ys).backward()
        tests[1].accumulate()
    answers = [t.finish() for t in tests]
    grad = max(((full(p.grad) - q.grad).abs().max() / q.grad.abs().max()).item()
               for p, q in zip(model.parameters(), ref_model.parameters()))  # (DDP's: its module's)
    mine, ref = tests
    placed = all(type(p.grad) is type(p.detach()) for p in model.parameters())  # (a DTensor's: a DTensor)
    return dict(answers=answers, grad_rel=grad, placed=placed,
                variance_rel=abs(float(mine.variance) / float(ref.variance) - 1),
                norm_sq_rel=abs(float(mine.grad_norm_sq) / float(ref.grad_norm_sq) - 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("store", help="the file of the FileStore the ranks meet at")
    ap.add_argument("--fsdp2", action="store_true")
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--tp", action="store_true")
    ap.add_argument("--save", type=pathlib.Path)
    ap.add_argument("--load", type=pathlib.Path)
    args = ap.parse_args()
    # uba_fused's warning that a torch scheduler and a schedule both set the lr must not fire: DCP's zero step
    # that creates a fresh optimizer's state sets the lr to 0 and back, which is no second schedule.
    warnings.filterwarnings("error", message=r"param_groups\[\d+\]\['lr'\] changed")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kind = os.environ.get("UBA_FUSED_DIST_DEVICE", "cpu")
    device = torch.device(kind, rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", init_method=f"file://{args.store}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh(kind, (world,))
    hsdp_mesh = init_device_mesh(kind, (1, world), mesh_dim_names=("replicate", "shard"))
    results = {}
    if args.fsdp2:  # clipping sums the norm over the mesh: every parameter must be a DTensor
        model, _ = sharded(CASES["adamw"], "torch", mesh, device, (6, 5, 3, 1))
        plain = torch.nn.Parameter(torch.ones(3, device=device))
        opt = uf.AdamW([*model.parameters(), plain], max_grad_norm=1.0, backend="torch")
        torch.nn.functional.mse_loss(model(batch(0, device)[0]), batch(0, device)[1]).backward()
        plain.grad = torch.ones_like(plain)
        try:
            opt.step()
            results["fsdp2/clip-mixed"] = "stepped"
        except ValueError as exc:
            results["fsdp2/clip-mixed"] = str(exc)
        results["fsdp2/clip-mixed-left-no-state"] = not opt.state
        model, _ = sharded(CASES["adamw"], "torch", mesh, device, (6, 5, 3, 1))  # AdAdaGrad's norm test, sharded
        results["fsdp2/norm-test"] = norm_test(model, make_model(device), rank, world, device)
    for case, make in CASES.items():
        for backend in BACKENDS[case]:
            name = f"{case}-{backend}"
            widths, whole = WIDTHS.get(case, (6, 5, 3, 1)), case in WIDTHS
            ref_model = make_model(device, widths)
            ref_opt = make(ref_model.parameters(), backend)
            train(ref_model, ref_opt, range(STEPS), 0, 1, device)

            if args.fsdp2:
                model, opt = sharded(make, backend, mesh, device, widths)
                save = None if args.save is None else args.save / name
                train(model, opt, range(STEPS), rank, world, device, save=save, whole=whole)
                results[f"fsdp2/{name}"] = distance(model, opt, ref_model, ref_opt)
                if case.startswith("adamw"):  # HSDP: a 2-D mesh, parameters placed (Replicate(), Shard(0))
                    model, opt = sharded(make, backend, hsdp_mesh, device, widths)
                    assert all(p.placements == (Replicate(), Shard(0)) for p in model.parameters())
                    train(model, opt, range(STEPS), rank, world, device, whole=whole)
                    results[f"hsdp/{name}"] = distance(model, opt, ref_model, ref_opt)
                    # a full (unsharded, plain-tensor) state dict on every rank, loaded into a fresh run
                    model, opt = sharded(make, backend, mesh, device, widths)
                    train(model, opt, range(SAVE_AT), rank, world, device, whole=whole)
                    full_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
                    model, opt = sharded(make, backend, mesh, device, widths)
                    set_state_dict(model, opt, model_state_dict=full_sd[0], optim_state_dict=full_sd[1],
                                   options=StateDictOptions(full_state_dict=True))
                    train(model, opt, range(SAVE_AT, STEPS), rank, world, device, whole=whole)
                    results[f"full/{name}"] = distance(model, opt, ref_model, ref_opt)
            if args.load is not None:  # continue from a checkpoint written on another number of ranks
                model, opt = sharded(make, backend, mesh, device, widths)
                model_sd, optim_sd = get_state_dict(model, opt)
                loaded = {"model": model_sd, "optim": optim_sd}
                dcp.load(loaded, checkpoint_id=args.load / name)
                set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
                train(model, opt, range(SAVE_AT, STEPS), rank, world, device, whole=whole)
                results[f"dcp/{name}"] = distance(model, opt, ref_model, ref_opt)
            if args.ddp and not whole:
                # gradients in DDP's buckets (one flat tensor, stable addresses) for one rule, its own for the other
                model = DistributedDataParallel(make_model(device), gradient_as_bucket_view=case == "sgd")
                opt = make(model.parameters(), backend)
                train(model, opt, range(STEPS), rank, world, device)
                results[f"ddp/{name}"] = distance(model.module, opt, ref_model, ref_opt)
    if args.ddp:  # the norm test under DDP: each micro-batch's backward all-reduced, so each p.grad is the global one
        results["ddp/norm-test"] = norm_test(DistributedDataParallel(make_model(device)), make_model(device), rank,
                                             world, device)
    if args.tp:  # on 4 ranks: FSDP2 over 2 ranks beside TP over 2 (torchtitan's 2-D layout), each pair on its slice
        tp_mesh, dp_mesh = mesh, None
        if world == 4:
            mesh_2d = init_device_mesh(kind, (2, 2), mesh_dim_names=("dp", "tp"))
            tp_mesh, dp_mesh = mesh_2d["tp"], mesh_2d["dp"]
        for case in TP_CASES:
            for backend in TP_BACKENDS if dp_mesh is None else TP_2D_BACKENDS:
                name = f"{case}-{backend}"
                ref_model = make_model(device, TP_WIDTHS)
                ref_opt = CASES[case](ref_model.parameters(), backend)
                ref_opt.record_grad_norms(STEPS)  # (L1 for AdamW and LAMB, L2 for LARS and SGD-SaI)
                train(ref_model, ref_opt, range(STEPS), 0, 1, device)
                model, opt = tensor_parallel(CASES[case], backend, tp_mesh, device, dp_mesh)
                opt.record_grad_norms(STEPS)
                if dp_mesh is None:
                    train(model, opt, range(STEPS), rank, world, device, whole=True)
                else:
                    train(model, opt, range(STEPS), dp_mesh.get_local_rank(), 2, device)
                results[f"tp/{name}"] = distance(model, opt, ref_model, ref_opt)
        model, _ = tensor_parallel(CASES["adamw"], "torch", tp_mesh, device, dp_mesh)  # the norm test, placed 3 ways
        results["tp/norm-test"] = norm_test(model, make_model(device, TP_WIDTHS), *(
            (rank, world) if dp_mesh is None else (dp_mesh.get_local_rank(), 2)), device, whole=dp_mesh is None)
        model, opt = tensor_parallel(CASES["adamp"], "torch", tp_mesh, device, dp_mesh)  # it sums whole rows
        try:
            train(model, opt, range(1), rank, world, device, whole=True)
            results["tp/adamp"] = "stepped"
        except ValueError as exc:
            results["tp/adamp"] = str(exc)
        results["tp/adamp-left-no-state"] = not opt.state
    (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: there torch's has aborted a rank whose results were written
    # ("terminate called without an active exception", a joinable thread destroyed; once in five CI runs,
    # 2026-12-04), a known hazard of gloo's threads at exit (pytorch#179291).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
