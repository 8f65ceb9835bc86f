"""A short run of every kernel for compute-sanitizer: every storage (parameter dtype, state dtype, codec: master
weights and stochastic rounding) on each kernel backend with the clipping pre-pass, every rule in it on CUDA and
two on Triton (rules_for); one step mixing every storage (every rule on CUDA, Adan on Triton); and a captured step
replayed.

    compute-sanitizer --tool memcheck python scripts/sanitize_steps.py
    compute-sanitizer --tool racecheck python scripts/sanitize_steps.py

The tensors are small (a few chunks, a ragged end, an empty one, a misaligned view): the sanitizers slow every
kernel down many times over.
"""

import functools
import sys

import torch

import uba_fused as uf
from uba_fused import backends, registry

RULES = {"adamw": uf.AdamW, "adabelief": uf.AdaBelief, "lion": uf.Lion, "adan": uf.Adan,
         "sgd-momentum": functools.partial(uf.SGD, momentum=0.9), "sgd": functools.partial(uf.SGD, momentum=0.0),
         "adagrad": functools.partial(uf.Adagrad, initial_accumulator_value=0.1),
         "lars": functools.partial(uf.LARS, momentum=0.9, weight_decay=0.01), "lamb": uf.LAMB, "diffgrad": uf.DiffGrad,
         # (delta 2 projects some of the random gradients' tensors, per row or whole)
         "adamp": functools.partial(uf.AdamP, delta=2.0, weight_decay=0.01),
         "sgdp": functools.partial(uf.SGDP, momentum=0.9, delta=2.0, weight_decay=0.01),
         "sgd_sai": functools.partial(uf.SGDSaI, momentum=0.9, weight_decay=0.01)}
MASTERLESS = ("lars",)  # rules that refuse a master slot (their norms are of the parameter as stored)
# registry.STORAGES as the options that choose them: (parameter dtype, state_dtype, master_weights, state_rounding)
STORAGES = [(getattr(torch, p), None if s == p else getattr(torch, s), registry.OPTION_OF_CODEC[c], r)
            for p, s, c, r in registry.STORAGES]


def params(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(4096 * 2 + 7,), (0,), (1,), (33, 65), (4096,)]
    ps = [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in shapes]
    ps.append(torch.randn(4096 + 1, device="cuda", generator=gen).to(dtype)[1:])  # misaligned view
    return [p.requires_grad_() for p in ps]


def rules_for(backend: str, i: int) -> list[str]:
    """The rules run alone in storage ``i`` on ``backend``: every rule on CUDA (compiled ahead), Adan (the most
    streams) and one other in turn on Triton, whose every rule x storage is 186 first-use compiles: under the
    sanitizers that took the run past its 120 s (2026-12-04, H200)."""
    return list(RULES) if backend == "cuda" else ["adan", [r for r in RULES if r != "adan"][i % (len(RULES) - 1)]]


def mixed_groups(backend):
    """One param group per storage: a step over them launches once per storage."""
    return [{"params": params(dtype, seed=i), "state_dtype": sd, "master_weights": mw, "state_rounding": sr}
            for i, (dtype, sd, mw, sr) in enumerate(STORAGES)]


def fill_grads(ps, gen):
    for p in ps:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(p.dtype)


def main() -> int:
    names = [b for b in ("triton", "cuda") if backends.availability("cuda")[b] is None]
    if len(names) < 2:
        print(f"a kernel backend is unavailable: {backends.availability('cuda')}")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(1)
    for backend in names:
        for i, (dtype, state_dtype, master_weights, state_rounding) in enumerate(STORAGES):  # alone, clipped
            for rule in rules_for(backend, i):
                if rule in MASTERLESS and master_weights in ("exact", "8bit"):
                    continue
                ps = params(dtype)
                opt = RULES[rule](ps, backend=backend, schedule=uf.UBA(10, warmup_steps=2), state_dtype=state_dtype,
                                  master_weights=master_weights, state_rounding=state_rounding, max_grad_norm=1.0)
                for _ in range(2):
                    fill_grads(ps, gen)
                    opt.step()
        for rule in RULES if backend == "cuda" else ["adan"]:
            # one step over every storage at once: one launch per storage, the last advancing the counters
            groups = [g for g in mixed_groups(backend)
                      if rule not in MASTERLESS or g["master_weights"] not in ("exact", "8bit")]
            opt = RULES[rule](groups, backend=backend, max_grad_norm=1.0)
            for _ in range(2):
                for g in groups:
                    fill_grads(g["params"], gen)
                opt.step()
        # a captured step (mixed storages, clipping), replayed; the warm-up on a side stream, as PyTorch's recipe
        groups = mixed_groups(backend)
        flat = [p for g in groups for p in g["params"]]
        opt = uf.Adan(groups, backend=backend, schedule=uf.Cosine(10), max_grad_norm=1.0)
        fill_grads(flat, gen)
        static = [p.grad for p in flat]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for _ in range(2):
            with torch.no_grad():
                for g in static:
                    g.normal_(generator=gen)
            graph.replay()
    torch.cuda.synchronize()
    print(f"ran every rule x storage (clipped), a mixed-storage step and a captured step on {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
