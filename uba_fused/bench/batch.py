"""``python -m uba_fused.bench.batch``: AdAdaGrad's adaptive batch size (uba_fused.NormTest) against fixed batches
that see the same number of samples.

Every run trains a task of ``bench.train`` with ``uba_fused.Adagrad`` (AdAdaGrad's rule; constant lr, no schedule),
or with ``--rule adagrad-norm`` ``uba_fused.AdagradNorm`` (AdAdaGrad-Norm's), from micro-batches of ``--micro``
samples until it has seen ``--samples`` samples:
  fixed-K     every step takes K micro-batches (``--fixed``, by default 2, 4 and 16);
  adaptive-E  the first step takes 2, and each next step the count the norm test asks for at eta E (``--etas``), at
              most ``--max-micro``: the batch grows when the gradient's noise outweighs it.
Each arm is taken at its own best lr of a grid (the lowest mean held-out loss over the seeds), as bench.train does.
The table gives the held-out loss (mean +- std over seeds), the steps taken, and the adaptive arm's batch size at a
quarter, half, three quarters and the end of the samples.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import uba_fused as uf

from .train import TASKS, best_lrs, sized

RULES = {"adagrad": uf.Adagrad, "adagrad-norm": uf.AdagradNorm}
# Each rule's lrs (AdaGrad-Norm's first step moves the parameters by lr in L2 norm, Adagrad's each coordinate by lr)
GRIDS = {"adagrad": (0.01, 0.03, 0.1, 0.3), "adagrad-norm": (0.1, 0.3, 1.0, 3.0)}


@dataclass(frozen=True)
class Run:
    task: str
    arm: str          # "fixed-K" (micro-batches per step) or "adaptive-E" (the norm test's eta)
    lr: float
    seed: int


def train_one(run: Run, a: argparse.Namespace, data: object) -> dict:
    """One run from its seed: the held-out loss, the steps, and the batch size (samples) at each quarter of the
    samples seen."""
    task = TASKS[run.task]
    torch.manual_seed(run.seed)
    model = task.model(a).to(a.device)
    opt = RULES[a.rule](model.parameters(), lr=run.lr, backend="cpu" if a.device == "cpu" else "auto")
    kind, value = run.arm.split("-")
    adaptive = kind == "adaptive"
    test = uf.NormTest(model.parameters(), eta=float(value), max_micro_batches=a.max_micro) if adaptive else None
    gen = torch.Generator().manual_seed(run.seed)
    k = 2 if adaptive else int(value)
    seen, steps, sizes, quarter = 0, 0, [], 1
    while seen < a.samples:
        for _ in range(k):
            task.loss(model, data, a.micro, gen).backward()
            if adaptive:
                test.accumulate()
        if adaptive:
            nxt = test.finish()
        else:
            for p in model.parameters():  # backward summed the k micro-batches' gradients: their mean
                p.grad /= k
            nxt = k
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += k * a.micro
        steps += 1
        while quarter <= 4 and seen >= quarter * a.samples / 4:
            sizes.append(k * a.micro)
            quarter += 1
        k = nxt
    model.eval()
    with torch.no_grad():
        out = task.evaluate(model, data, a)
    return {**vars(run), "loss": out["loss"], "steps": steps, "batch_at_quarters": sizes}


def summarize(results: list[dict]) -> list[dict]:
    """Per task and arm, the lr with the lowest mean loss over the seeds (a diverged seed makes it inf), marked
    ``edge`` when it is an end of the grid (bench.train's best_lrs): its row, with the seeds' mean and spread."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault((r["task"], r["arm"], r["lr"]), []).append(r)
    rows = []
    for (task, arm, lr), rs in cells.items():
        losses = [r["loss"] for r in rs]
        finite = all(math.isfinite(x) for x in losses)
        rows.append({"task": task, "arm": arm, "lr": lr, "seeds": len(rs),
                     "loss": statistics.fmean(losses) if finite else math.inf,
                     "loss_std": statistics.stdev(losses) if finite and len(losses) > 1 else 0.0,
                     "steps": statistics.fmean(r["steps"] for r in rs),
                     "batch_at_quarters": [statistics.fmean(q) for q in zip(*(r["batch_at_quarters"] for r in rs))]})
    return best_lrs(rows, by=("task", "arm"))


def format_table(best: list[dict], a: argparse.Namespace) -> str:
    lines = [f"{RULES[a.rule].__name__}, micro-batches of {a.micro}, {a.samples} samples per run, at most "
             f"{a.max_micro} micro-batches; each arm at its best lr (^: an end of the grid); mean +- std over "
             f"{a.seeds} seeds"]
    lines.append(f"{'task':15s}{'arm':13s}{'held-out loss':>22s}{'lr':>9s}{'steps':>8s}   batch at 1/4 1/2 3/4 end")
    for r in best:
        loss = "diverged" if not math.isfinite(r["loss"]) else f"{r['loss']:.4f} +- {r['loss_std']:.4f}"
        sizes = " ".join(f"{s:.0f}" for s in r["batch_at_quarters"])
        lines.append(f"{r['task']:15s}{r['arm']:13s}{loss:>22s}{r['lr']:>8.3g}{'^' if r['edge'] else ' '}"
                     f"{r['steps']:>8.0f}   {sizes}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m uba_fused.bench.batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["teacher-k1000", "digits"])
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--micro", type=int, default=4, help="samples per micro-batch")
    ap.add_argument("--fixed", nargs="+", type=int, default=[2, 4, 16],
                    help="micro-batches per step of the fixed arms")
    ap.add_argument("--etas", nargs="+", type=float, default=[1.0, 2.0, 3.0], help="the adaptive arms' etas")
    ap.add_argument("--max-micro", type=int, default=64)
    ap.add_argument("--rule", choices=list(RULES), default="adagrad")
    ap.add_argument("--lrs", nargs="+", type=float, help="the lr grid (default: the rule's, GRIDS)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.samples < 1 or a.micro < 1 or min(a.fixed) < 1 or a.seeds < 1 or a.max_micro < 2 or not min(a.etas) > 0:
        ap.error("--samples, --micro, --fixed and --seeds must be >= 1, --max-micro >= 2, --etas > 0")
    a.lrs = a.lrs or list(GRIDS[a.rule])
    a.scale, a.batch = 1, a.micro  # (what bench.train's models and evaluations read)
    return sized(a)


def main(argv=None) -> int:
    from tqdm import tqdm

    a = parse_args(argv)
    arms = [f"fixed-{k}" for k in a.fixed] + [f"adaptive-{e:g}" for e in a.etas]
    runs = [Run(t, arm, lr, s) for t in a.tasks for arm in arms for lr in a.lrs for s in range(a.seeds)]
    data = {t: TASKS[t].data(a, torch.device(a.device)) for t in a.tasks}
    t0, results = time.time(), []
    for run in tqdm(runs, desc="runs", file=sys.stderr):
        results.append(train_one(run, a, data[run.task]))
    print(format_table(summarize(results), a))
    print(f"\n{len(runs)} runs in {time.time() - t0:.0f} s (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
