"""Host time of one kernel-backend step() on a GPT-2-medium-sized list (292 tensors), in isolation.

    python benchmarks/host_overhead.py [triton] [cuda]              (default: both)
    python benchmarks/host_overhead.py --device cuda [triton] [cuda]
    python benchmarks/host_overhead.py --dtensor [...]               (parameters as FSDP2 keeps them)

Without --device (or with --device cpu) it runs on any machine: the parameters are tiny CPU tensors and
the kernel launch is replaced by a no-op, so what is timed is the optimizer's own Python and C++ (and
torch.optim's step wrapper), nothing else. With --device cuda the parameters are tiny CUDA tensors
and the kernels really launch (they finish long before the host's next step, so nothing queues):
that adds the launch and the pinned copy of the gradient addresses. Median and 10th percentile of
wall-clock time around step(), for three cases:
  - gradients at the addresses of the last step (the caching allocator often arranges it),
  - every gradient at a new address (what backward gives in a real training loop),
  - a new subset of 16 parameters without a gradient every step (mixture-of-experts routing).
With --dtensor the parameters are sharded by FSDP2 (fully_shard, on a one-rank mesh: gloo on the CPU,
NCCL on a GPU), and the gradients are the DTensors its backward gives, and a last row times
torch.optim.AdamW's step (its default implementation: for-loop on CPU, foreach on CUDA) on the same
list: that one does its real math, op by op through DTensor's dispatch.
"""

import argparse
import os
import statistics
import time

_args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_args.add_argument("backends", nargs="*", help="triton and/or cuda (default: both)")
_args.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
_args.add_argument("--steps", type=int, default=1000)
_args.add_argument("--dtensor", action="store_true", help="DTensor parameters on a one-rank mesh")
ARGS = _args.parse_args()
if set(ARGS.backends) - {"triton", "cuda"}:
    _args.error(f"backends are triton and cuda, got {ARGS.backends}")
if ARGS.device == "cpu":  # lets the kernel backends take CPU tensors; their launch is stubbed below
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["UBA_FUSED_CUDA_ON_CPU"] = "1"

import torch  # noqa: E402

import uba_fused as uf  # noqa: E402
from uba_fused import backends  # noqa: E402

N_TENSORS = 292


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _NoFusedStep:
    """uba_fused._C with fused_step a no-op: the binding's own argument checks are not timed."""

    def __init__(self, c):
        self._c = c

    def __getattr__(self, name):
        return (lambda *args: None) if name == "fused_step" else getattr(self._c, name)


def stub_launch(backend: str) -> None:
    if backend == "triton":
        from uba_fused.backends import triton as module
        module._step_kernel = _NoLaunch()
    else:
        from uba_fused.backends import cuda as module
        module._C = _NoFusedStep(module._C)


def timed(opt, before, n):
    ts = []
    for _ in range(n):
        before()
        t0 = time.perf_counter()
        opt.step()
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.quantiles(ts, n=10)[0], statistics.median(ts)


class _Params(torch.nn.Module):
    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.ps = torch.nn.ParameterList(tensors)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return sum((p * w).sum() for p in self.ps)


def make_params(device: str, mesh, gen: torch.Generator) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The parameters and two sets of gradients for them: random tensors, or with a mesh, what FSDP2 makes
    of them (sharded parameters, and the gradients of two backward passes)."""
    holder = _Params([torch.randn(8, generator=gen).to(device) for _ in range(N_TENSORS)])
    if mesh is None:
        return list(holder.ps), [[torch.randn(8, generator=gen).to(device) for _ in holder.ps] for _ in range(2)]
    fully_shard(holder, mesh=mesh)
    grads = []
    for _ in range(2):
        holder.zero_grad(set_to_none=True)
        w = torch.randn(8, generator=gen).to(device)
        holder(w).backward()
        grads.append([p.grad for p in holder.ps])
    return list(holder.ps), grads


def main(backend: str, device: str, steps: int, mesh) -> None:
    if device == "cpu" and backend != "torch.optim":
        stub_launch(backend)
    gen = torch.Generator().manual_seed(0)
    params, grads = make_params(device, mesh, gen)
    if backend == "torch.optim":
        steps = min(steps, 30)  # its step takes a tenth of a second here
        opt = torch.optim.AdamW(params)
    else:
        opt = uf.AdamW(params, backend=backend, schedule=uf.UBA(10_000))
    which = [0]

    def same_addresses():  # new gradient objects where the last ones were (DTensors: the same objects, as
        for p, g in zip(params, grads[0]):  # detach() would give them a DTensorSpec of their own, unlike FSDP2)
            p.grad = g.detach() if mesh is None else g

    def new_addresses():  # two sets of tensors in turn: every address differs from the last step's
        which[0] ^= 1
        for p, g in zip(params, grads[which[0]]):
            p.grad = g

    def new_subset():
        drop = set(torch.randperm(len(params), generator=gen)[:16].tolist())
        for i, p in enumerate(params):
            p.grad = None if i in drop else grads[0][i]

    for _ in range(3):
        same_addresses()
        opt.step()
    for label, before, n in [("gradients at the same addresses", same_addresses, 3 * steps),
                             ("gradients at new addresses", new_addresses, steps),
                             ("a new subset of gradients", new_subset, steps)]:
        p10, med = timed(opt, before, n)
        what = "launch stubbed" if device == "cpu" and backend != "torch.optim" else "real launches"
        kind = "DTensors" if mesh is not None else "tensors"
        print(f"{backend:6s} {label:34s} p10 {p10:7.0f} us   median {med:7.0f} us   "
              f"({n} steps, {N_TENSORS} {kind}, {device}, {what})")
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    mesh = None
    if ARGS.dtensor:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("nccl" if ARGS.device == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        mesh = init_device_mesh(ARGS.device, (1,))
    for name in ARGS.backends or ["triton", "cuda"]:
        reason = backends.availability(ARGS.device)[name]
        if reason:
            print(f"{name}: skipped, {reason}")
        else:
            main(name, ARGS.device, ARGS.steps, mesh)
    if ARGS.dtensor:
        main("torch.optim", ARGS.device, ARGS.steps, mesh)
        dist.destroy_process_group()
