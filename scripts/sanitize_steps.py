"""A short run of every kernel (rule x dtype x backend) on a mixed list, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_steps.py
    compute-sanitizer --tool racecheck python scripts/sanitize_steps.py
"""

import sys

import torch

import uba_fused as uf
from uba_fused import backends

OPTS = [uf.AdamW, uf.AdaBelief, uf.Lion, lambda ps, **kw: uf.SGD(ps, momentum=0.9, **kw),
        lambda ps, **kw: uf.SGD(ps, momentum=0.0, **kw)]


def params(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096 * 3 + 7,), (0,), (1,), (33, 65), (4096,)]
    ps = [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in shapes]
    ps.append(torch.randn(4096 * 2 + 1, device="cuda", dtype=dtype, generator=gen)[1:])  # misaligned view
    return [p.requires_grad_() for p in ps]


def main() -> int:
    names = [b for b in ("triton", "cuda") if backends.availability("cuda")[b] is None]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for backend in names:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for make in OPTS:
                ps = params(dtype)
                opt = make(ps, backend=backend, schedule=uf.UBA(10, warmup_steps=2))
                for _ in range(3):
                    for p in ps:
                        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen)
                    opt.step()
    torch.cuda.synchronize()
    print(f"ran every rule x dtype on {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
