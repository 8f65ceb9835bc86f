"""step() of backend "cpu" (what auto takes for CPU parameters) against torch.optim's fastest for each rule.

    python benchmarks/cpu_step.py [--preset cpu-small] [--rounds 40] [--block 20] [RULE ...]

RULE: adamw sgd lion adabelief adan adagrad lamb diffgrad adamp sgdp sgd_sai (default: all).

The two optimizers of a pair update the same parameter list, in alternating blocks of ``--block`` steps
(which one goes first alternates too), so a noisy neighbour on a shared VM slows both alike. Each step gets
fresh gradient objects at the same addresses, outside the timed region; what is timed is the wall clock
around ``step()``, steps back to back (the previous step's memory traffic has flushed the caches, as in a
training loop). Median over every timed step.

The baselines are those of issue #13: torch's ``fused=True`` for AdamW, SGD (momentum 0.9) and Adagrad, an obvious
``torch._foreach_*`` implementation for Lion and AdaBelief (``ObviousForeach`` in uba_fused/bench), and for
Adan, LAMB and DiffGrad, which torch lacks, uba_fused's own readable backend "torch" (for LAMB, timm's foreach Lamb
where timm imports; for DiffGrad, torch-optimizer's where it imports), and for AdamP and SGDP the adamp package's
where it imports, and for SGD-SaI the sgd-sai package's (both pinned by requirements-test.txt). Ours runs a UBA
schedule, as in the throughput benchmark; the baselines have none.
"""

import argparse
import contextlib
import io
import statistics
import time

import torch

import uba_fused as uf
from uba_fused.bench.presets import PRESETS
from uba_fused.bench.throughput import HYPER, OURS, ObviousForeach

BASELINES = {
    "adamw": ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, **HYPER["adamw"], fused=True)),
    "sgd": ("torch SGD momentum fused", lambda ps: torch.optim.SGD(ps, **HYPER["sgd"], fused=True)),
    "lion": ("foreach Lion (obvious)", lambda ps: ObviousForeach(ps, "lion", **HYPER["lion"])),
    "adabelief": ("foreach AdaBelief (obvious)", lambda ps: ObviousForeach(ps, "adabelief", **HYPER["adabelief"])),
    "adan": ("uba_fused.Adan [torch]", lambda ps: uf.Adan(ps, **HYPER["adan"], backend="torch")),
    "adagrad": ("torch Adagrad fused", lambda ps: torch.optim.Adagrad(ps, **HYPER["adagrad"], fused=True)),
    "lamb": ("uba_fused.LAMB [torch]", lambda ps: uf.LAMB(ps, **HYPER["lamb"], backend="torch")),
    "diffgrad": ("uba_fused.DiffGrad [torch]", lambda ps: uf.DiffGrad(ps, **HYPER["diffgrad"], backend="torch")),
}
try:
    from timm.optim.lamb import Lamb  # optional
    BASELINES["lamb"] = ("timm Lamb foreach", lambda ps: Lamb(ps, **HYPER["lamb"]))
except ImportError:
    pass
try:
    from torch_optimizer.diffgrad import DiffGrad  # optional
    BASELINES["diffgrad"] = ("torch-optimizer DiffGrad", lambda ps: DiffGrad(ps, **HYPER["diffgrad"]))
except ImportError:
    pass


try:
    import adamp  # optional
    BASELINES["adamp"] = ("adamp package AdamP", lambda ps: adamp.AdamP(ps, **HYPER["adamp"]))
    BASELINES["sgdp"] = ("adamp package SGDP", lambda ps: adamp.SGDP(ps, **HYPER["sgdp"]))
except ImportError:
    pass
try:
    import sgd_sai  # optional

    def _sgd_sai(ps):
        opt = sgd_sai.SGD_sai(ps, **HYPER["sgd_sai"])
        warmup = opt.warmup_step

        def quiet(closure=None):  # (its first step() calls it, which prints a banner into the table)
            with contextlib.redirect_stdout(io.StringIO()):
                return warmup(closure)

        opt.warmup_step = quiet
        return opt

    BASELINES["sgd_sai"] = ("sgd-sai package SGD_sai", _sgd_sai)
except ImportError:
    pass


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("rules", nargs="*", help=f"any of {', '.join(BASELINES)} (default: all)")
    args.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    args.add_argument("--rounds", type=int, default=40)
    args.add_argument("--block", type=int, default=20)
    a = args.parse_args()
    unknown = [r for r in a.rules if r not in BASELINES]
    if unknown:
        args.error(f"unknown rules {unknown}; choose from {list(BASELINES)}")
    gen = torch.Generator().manual_seed(0)
    shapes = PRESETS[a.preset].shapes
    params = [torch.randn(s, generator=gen).mul_(0.02).requires_grad_() for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]

    def fresh() -> None:
        for p, g in zip(params, grads):
            p.grad = g.detach()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {a.preset} "
          f"({len(shapes)} tensors), {a.rounds} rounds of {a.block} steps each, wall clock, median")
    print(f"{'rule':10s} {'uba_fused [cpu] ms':>19s} {'baseline ms':>12s}  ratio  baseline")
    for rule in a.rules or list(BASELINES):
        name, make = BASELINES[rule]
        pair = {"ours": OURS[rule](params, **HYPER[rule], schedule=uf.UBA(10_000, phi=1.0), backend="cpu"),
                "base": make(params)}
        times: dict[str, list[float]] = {k: [] for k in pair}
        for k, opt in pair.items():  # warm-up: state made, caches of both built
            for _ in range(3):
                fresh()
                opt.step()
        for r in range(a.rounds):
            for k in (("ours", "base") if r % 2 else ("base", "ours")):
                for _ in range(a.block):
                    fresh()
                    t0 = time.perf_counter()
                    pair[k].step()
                    times[k].append(time.perf_counter() - t0)
        ours, base = (statistics.median(times[k]) * 1e3 for k in ("ours", "base"))
        print(f"{rule:10s} {ours:19.3f} {base:12.3f}  {ours / base:4.2f}x  {name}")


if __name__ == "__main__":
    main()
