"""Host-side Python cost of one kernel-backend step() on a GPT-2-medium-sized list (292 tensors),
measurable without a GPU: the parameters are tiny CPU tensors and the kernel launch is replaced by a
no-op, so what is timed is the optimizer's own Python (and torch.optim's step wrapper), nothing else.

    python benchmarks/host_overhead.py [triton|cuda]     (default: both)
"""

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" take CPU tensors; the launch is stubbed below
os.environ["UBA_FUSED_CUDA_ON_CPU"] = "1"  # the same for backend="cuda"

import torch  # noqa: E402

import uba_fused as uf  # noqa: E402
from uba_fused import backends  # noqa: E402


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
    ts.sort()
    return ts[n // 10], ts[n // 2]


def main(backend: str) -> None:
    stub_launch(backend)
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(292)]
    opt = uf.AdamW(params, backend=backend, schedule=uf.UBA(10_000))
    buf = torch.randn(292, 8)

    def same_addresses():  # new gradient objects where the last ones were, as the caching allocator gives
        for i, p in enumerate(params):
            p.grad = buf[i]

    def new_addresses():
        for i, p in enumerate(params):
            p.grad = buf[i].clone()

    gen = torch.Generator().manual_seed(0)

    def new_subset():  # 16 parameters without a gradient, a different 16 each step (mixture-of-experts routing)
        drop = set(torch.randperm(len(params), generator=gen)[:16].tolist())
        for i, p in enumerate(params):
            p.grad = None if i in drop else buf[i]

    same_addresses()
    opt.step()
    for label, before, n in [("gradients at the same addresses", same_addresses, 3000),
                             ("gradients at new addresses", new_addresses, 1000),
                             ("a new subset of gradients", new_subset, 1000)]:
        p10, med = timed(opt, before, n)
        print(f"{backend:6s} {label:34s} p10 {p10:7.0f} us   median {med:7.0f} us   "
              f"({n} steps, 292 tensors, launch stubbed)")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["triton", "cuda"]:
        reason = backends.availability("cpu")[name]
        if reason:
            print(f"{name}: skipped, {reason}")
        else:
            main(name)
