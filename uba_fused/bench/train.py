"""``python -m uba_fused.bench.train``: a schedule study, each schedule at its own best peak learning rate.

Four tasks on data that needs no download:
  charlm         a small character-level transformer language model on this Python's own standard-library
                 sources (bytes as tokens; the last 10% of the text is held out)
  digits         a small convolutional classifier on scikit-learn's bundled 8x8 digits (a fixed 20% held out)
  teacher-k10    regression: a small MLP fits a fixed random teacher network (plus noise) on Gaussian inputs
  teacher-k1000  whose covariance has condition number 10 or 1000, rotated off the coordinate axes so that
                 Adam's per-coordinate scaling cannot undo it (held-out mean squared error, targets at unit
                 variance; the noise alone gives 0.01)

Every schedule (UBA at phi 0.25, 0.5, 1, 2 and 4, where phi=2 is exactly the cosine; Linear; REX;
Constant; each after a linear warmup of 5% of the budget) trains every task at every budget and every
peak lr of a grid, from the same seeds, with uba_fused.AdamW. "Refined" (asked for by name) is Defazio et
al.'s refinement (uba_fused.Refined): the Linear runs record their gradient norms (AdamW's: L1), and for
each task and budget the seeds' mean norms of Linear at its best lr refine a schedule for the same budget,
which then trains over the same lr grid and seeds (after the same 5% warmup) as a second run. The grid is 4
values 2x apart around each task's default lr (``--lrs`` replaces it). Three tables:
  1. each schedule at its own best peak lr: the lr whose mean held-out loss over the seeds is lowest, and
     that lr (chosen on the held-out loss it reports, which favours every schedule alike);
  2. each schedule at one fixed lr, the task's default: the view of a shared lr;
  3. UBA's best phi for each task and budget, each phi at its own best lr.
A run whose loss becomes non-finite counts as diverged, and its lr cannot be chosen.

``--precisions`` adds a precision study: the model's parameters in bfloat16, kept as each layout keeps them
(``PRECISIONS``: rounded to nearest, the control; float32 moments; exact master weights; stochastic rounding), and
bfloat16 moments (stochastic, or to nearest as the control) beside float32 or bfloat16-master parameters, beside
float32, each at its own best peak lr too (rows "schedule [precision]").

Defaults finish in about 10 minutes on a 2-core CPU, the runs spread over one process per core
(``--workers``). ``--scale``, ``--budgets``, ``--lrs`` and ``--device cuda`` take it to a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import uba_fused as uf
from uba_fused import registry

from .throughput import device_name

PHIS = (0.25, 0.5, 1.0, 2.0, 4.0)


def uba_name(phi: float) -> str:
    return f"UBA phi={phi:g}" + (" (=Cosine)" if phi == 2 else "")


def _uba(phi: float) -> Callable[[int, int], uf.Schedule]:
    return lambda T, W: uf.UBA(T, phi=phi, warmup_steps=W)


SCHEDULES: dict[str, Callable[[int, int], uf.Schedule]] = {
    **{uba_name(phi): _uba(phi) for phi in PHIS},
    "Linear": lambda T, W: uf.Linear(T, warmup_steps=W),
    "REX": lambda T, W: uf.REX(T, warmup_steps=W),
    "Constant": lambda T, W: uf.Constant(warmup_steps=W),
}
GRID = (0.5, 1.0, 2.0, 4.0)  # the default lr grid, as multiples of a task's default lr
REFINED = "Refined"  # (a second run, from the Linear runs' norms: not a closed form)
# How the model's parameters and the optimizer's state are kept: (parameter dtype, optimizer options).
PRECISIONS: dict[str, tuple[torch.dtype, dict]] = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),  # rounded to nearest at every step, moments in bf16: what torch.optim does
    "bf16-fp32-state": (torch.bfloat16, {"state_dtype": torch.float32}),
    "bf16-master": (torch.bfloat16, {"state_dtype": torch.float32, "master_weights": "exact"}),
    "bf16-stochastic": (torch.bfloat16, {"state_dtype": torch.float32, "master_weights": "stochastic"}),
    # moments in bf16: rounded stochastically, and to nearest (the control); beside exact bf16 master weights
    "fp32-bf16-state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32-bf16-state-nearest": (torch.float32, {"state_dtype": torch.bfloat16, "state_rounding": "nearest"}),
    "bf16-master-bf16-state": (torch.bfloat16, {"state_dtype": torch.bfloat16, "master_weights": "exact"}),
    # the 24-bit master (an 8-bit correction), with float32 and with bf16 moments
    "bf16-master8": (torch.bfloat16, {"state_dtype": torch.float32, "master_weights": "8bit"}),
    "bf16-master8-bf16-state": (torch.bfloat16, {"state_dtype": torch.bfloat16, "master_weights": "8bit"}),
    # 8-bit moments (parameters of 4096 elements and more): codes rounded stochastically, and to nearest (the control)
    "fp32-8bit-state": (torch.float32, {"state_dtype": torch.int8}),
    "fp32-8bit-state-nearest": (torch.float32, {"state_dtype": torch.int8, "state_rounding": "nearest"}),
    "bf16-master8-8bit-state": (torch.bfloat16, {"state_dtype": torch.int8, "master_weights": "8bit"}),
}


def variant(schedule: str, precision: str) -> str:
    """A row's label: the schedule, and the precision unless float32."""
    return schedule if precision == "fp32" else f"{schedule} [{precision}]"


class InDtype(nn.Module):
    """A model whose parameters are in a 16-bit dtype: floating inputs cast to it, outputs back to float32 (the
    losses and metrics are computed in float32)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, x):
        return self.model(x.to(self.dtype) if x.is_floating_point() else x).float()


# ------------------------------------------------------------------ data
def stdlib_text(max_bytes: int) -> bytes:
    """The .py files of this Python's standard library, in a fixed order, up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    out, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


class CharData:
    def __init__(self, max_bytes: int, ctx: int, device: torch.device):
        text = torch.frombuffer(bytearray(stdlib_text(max_bytes)), dtype=torch.uint8).long()
        cut = int(0.9 * len(text))
        self.train, self.val, self.ctx, self.device = text[:cut].to(device), text[cut:].to(device), ctx, device

    def batch(self, split: str, size: int, gen: torch.Generator):
        data = self.train if split == "train" else self.val
        idx = torch.randint(len(data) - self.ctx - 1, (size,), generator=gen).to(self.device)
        offs = idx[:, None] + torch.arange(self.ctx + 1, device=self.device)
        chunk = data[offs]
        return chunk[:, :-1], chunk[:, 1:]


class DigitsData:
    def __init__(self, device: torch.device):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        cut = int(0.8 * len(y))
        tr, te = perm[:cut], perm[cut:]
        self.xtr, self.ytr = x[tr].to(device), y[tr].to(device)
        self.xte, self.yte = x[te].to(device), y[te].to(device)
        self.device = device

    def batch(self, size: int, gen: torch.Generator):
        idx = torch.randint(len(self.ytr), (size,), generator=gen).to(self.device)
        return self.xtr[idx], self.ytr[idx]


class TeacherData:
    """Inputs x = z diag(s) Q^T with z standard normal, s geometric from 1 down to kappa^-1/2 and Q a random
    rotation, so their covariance Q diag(s^2) Q^T has condition number kappa. The targets are a fixed random
    tanh network of z, the whitened inputs, plus noise of a tenth of their spread, scaled to unit variance:
    every direction of x carries signal, and the weakest needs weights kappa^1/2 times the strongest's.
    Everything comes from fixed seeds."""

    DIM, HIDDEN, TRAIN, HELD_OUT = 16, 32, 4096, 2048

    def __init__(self, kappa: float, device: torch.device):
        gen = torch.Generator().manual_seed(4321)
        d, n = self.DIM, self.TRAIN + self.HELD_OUT
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        scales = kappa ** (-torch.arange(d) / (2.0 * (d - 1)))
        w1 = torch.randn(d, self.HIDDEN, generator=gen) / math.sqrt(d)  # pre-activations of unit scale
        w2 = torch.randn(self.HIDDEN, 1, generator=gen) / math.sqrt(self.HIDDEN)
        z = torch.randn(n, d, generator=gen)
        clean = torch.tanh(z @ w1) @ w2
        y = clean + 0.1 * clean.std() * torch.randn(clean.shape, generator=gen)
        y = (y - y[: self.TRAIN].mean()) / y[: self.TRAIN].std()
        x = (z * scales) @ rotation.T
        self.xtr, self.ytr = x[: self.TRAIN].to(device), y[: self.TRAIN].to(device)
        self.xte, self.yte = x[self.TRAIN:].to(device), y[self.TRAIN:].to(device)
        self.device = device

    def batch(self, size: int, gen: torch.Generator):
        idx = torch.randint(len(self.ytr), (size,), generator=gen).to(self.device)
        return self.xtr[idx], self.ytr[idx]


# ------------------------------------------------------------------ models
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, ctx: int, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos[: idx.shape[1]])))


def digits_cnn(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(),
                         nn.Linear(64, 10))


# ------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """One task: its data, its model, a training loss on one batch and the held-out metrics."""

    name: str
    lr: float                 # the default peak lr: the centre of the default grid, and table 2's lr
    budgets: tuple[int, ...]  # default step budgets on a CPU, each twice the last
    weight_decay: float
    data: Callable[[argparse.Namespace, torch.device], object]
    model: Callable[[argparse.Namespace], nn.Module]
    loss: Callable[[nn.Module, object, int, torch.Generator], torch.Tensor]
    evaluate: Callable[[nn.Module, object, argparse.Namespace], dict[str, float]]


def _lm_loss(model, data, batch, gen):
    x, y = data.batch("train", batch, gen)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _lm_eval(model, data, a):
    vgen, losses = torch.Generator().manual_seed(999), []
    for _ in range(a.eval_batches):
        x, y = data.batch("val", a.batch, vgen)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return {"loss": statistics.fmean(losses)}


def _digits_loss(model, data, batch, gen):
    x, y = data.batch(batch, gen)
    return F.cross_entropy(model(x), y)


def _digits_eval(model, data, a):
    logits = model(data.xte)
    return {"loss": F.cross_entropy(logits, data.yte).item(),
            "accuracy": (logits.argmax(1) == data.yte).float().mean().item()}


def _teacher_loss(model, data, batch, gen):
    x, y = data.batch(batch, gen)
    return F.mse_loss(model(x), y)


def _teacher_eval(model, data, a):
    return {"loss": F.mse_loss(model(data.xte), data.yte).item()}


def _teacher(kappa: float) -> Task:
    return Task(f"teacher-k{kappa:g}", 1e-2, (200, 400, 800, 1600), 0.0,
                lambda a, device: TeacherData(kappa, device),
                lambda a: nn.Sequential(nn.Linear(TeacherData.DIM, 16 * a.scale), nn.ReLU(),
                                        nn.Linear(16 * a.scale, 16 * a.scale), nn.ReLU(), nn.Linear(16 * a.scale, 1)),
                _teacher_loss, _teacher_eval)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("charlm", 1.6e-2, (50, 100, 200, 400), 0.1,
         lambda a, device: CharData(a.text_bytes, a.ctx, device),
         lambda a: CharLM(a.width, a.layers, 4, a.ctx), _lm_loss, _lm_eval),
    Task("digits", 1.6e-2, (100, 200, 400, 800), 0.01, lambda a, device: DigitsData(device),
         lambda a: digits_cnn(max(1, a.width // 4)), _digits_loss, _digits_eval),
    _teacher(10),
    _teacher(1000),
)}


# ------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Job:
    task: str
    budget: int
    schedule: str
    lr: float
    seed: int
    precision: str = "fp32"
    factors: tuple[float, ...] | None = None  # Refined's lr factors, one per step (a Table)
    record: bool = False                      # record the gradient norms (the Linear runs Refined refines)


def train_one(task: Task, data: object, job: Job, a: argparse.Namespace, device: torch.device) -> dict:
    """Train from the job's seed for its budget; the held-out metrics, or a non-finite loss if it diverged."""
    torch.manual_seed(job.seed)
    dtype, options = PRECISIONS[job.precision]
    model = task.model(a).to(device)
    if dtype != torch.float32:
        model = InDtype(model, dtype)
    if job.factors is not None:
        schedule = uf.Table(torch.tensor(job.factors, dtype=torch.float32, device=device))
    else:
        schedule = SCHEDULES[job.schedule](job.budget, warmup_of(job.budget))
    opt = uf.AdamW(model.parameters(), lr=job.lr, weight_decay=task.weight_decay, schedule=schedule, **options)
    if job.record:
        opt.record_grad_norms(job.budget)
    gen = torch.Generator().manual_seed(job.seed)
    for _ in range(job.budget):
        loss = task.loss(model, data, a.batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = task.evaluate(model, data, a)
    return {**out, "grad_norms": opt.grad_norms.tolist()} if job.record else out


def warmup_of(budget: int) -> int:
    """Every schedule's warmup: 5% of the budget, at least one step."""
    return max(1, budget // 20)


def refined_jobs(results: list[dict], jobs: list[Job]) -> list[Job]:
    """The Refined runs: per task, budget and precision, the schedule refined from the mean gradient norms over the
    seeds of the Linear runs at Linear's best lr, trained at each lr and seed the Linear runs had."""
    best = {(b["task"], b["budget"], b["schedule"]): b["lr"] for b in best_lrs(summarize(results))}
    out = []
    for task, budget, prec in dict.fromkeys((j.task, j.budget, j.precision) for j in jobs if j.record):
        lr = best[(task, budget, variant("Linear", prec))]
        norms = [r["grad_norms"] for r in results if r.get("grad_norms") and r["lr"] == lr and
                 (r["task"], r["budget"], r["precision"]) == (task, budget, prec)]
        mean = torch.tensor(norms, dtype=torch.float64).mean(0)
        try:
            factors = uf.Refined(mean, ord=registry.RULES[uf.AdamW.rule].grad_norms_ord,
                                 warmup_steps=warmup_of(budget)).factors.tolist()
        except ValueError as exc:  # (every Linear lr diverged: no norms to refine from)
            print(f"no Refined runs for {task} at T={budget} [{prec}]: {exc}", file=sys.stderr)
            continue
        out += [Job(task, budget, REFINED, j.lr, j.seed, prec, tuple(factors)) for j in jobs
                if j.record and (j.task, j.budget, j.precision) == (task, budget, prec)]
    return out


_WORKER: dict = {}  # in each worker process: the arguments, the device and each task's data, made once


def _worker_init(a: argparse.Namespace, threads: int) -> None:
    torch.set_num_threads(threads)
    device = torch.device(a.device)
    _WORKER.update(a=a, device=device, data={t: TASKS[t].data(a, device) for t in a.tasks})


def _worker_run(job: Job) -> dict:
    w = _WORKER
    fields = {k: v for k, v in vars(job).items() if k not in ("factors", "record")}
    return {**fields, **train_one(TASKS[job.task], w["data"][job.task], job, w["a"], w["device"])}


def run_all(jobs: list[Job], a: argparse.Namespace, progress=None) -> list[dict]:
    """Every job, in this process or spread over ``a.workers`` processes (each with its share of the cores);
    each run seeds itself, so the results do not depend on which process ran it."""
    if a.workers <= 1:
        _worker_init(a, torch.get_num_threads())
        results = []
        for job in jobs:
            results.append(_worker_run(job))
            if progress:
                progress.update(1)
        return results
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    with concurrent.futures.ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init, initargs=(a, threads)) as pool:
        futures = [pool.submit(_worker_run, job) for job in jobs]
        for f in concurrent.futures.as_completed(futures):
            f.result()
            if progress:
                progress.update(1)
        return [f.result() for f in futures]


# ------------------------------------------------------------------ analysis
def summarize(results: list[dict]) -> list[dict]:
    """Per task, budget, schedule (with its precision: ``variant``) and lr: the seeds' mean and standard deviation of
    each metric; the loss of a cell with a diverged seed is infinite (that lr is not usable)."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault((r["task"], r["budget"], variant(r["schedule"], r.get("precision", "fp32")), r["lr"]),
                         []).append(r)
    out = []
    for (task, budget, sched, lr), rs in cells.items():
        row = {"task": task, "budget": budget, "schedule": sched, "lr": lr, "seeds": len(rs),
               "diverged": sum(not math.isfinite(r["loss"]) for r in rs)}
        for metric in ("loss", "accuracy"):
            vals = [r[metric] for r in rs if metric in r]
            if not vals:
                continue
            if row["diverged"]:
                row[metric], row[metric + "_std"] = (math.inf if metric == "loss" else math.nan), math.nan
            else:
                row[metric] = statistics.fmean(vals)
                row[metric + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    order = [variant(s, p) for p in PRECISIONS for s in [*SCHEDULES, REFINED]]
    return sorted(out, key=lambda s: (s["task"], s["budget"], order.index(s["schedule"]), s["lr"]))


def best_lrs(summary: list[dict], by: tuple[str, ...] = ("task", "budget", "schedule")) -> list[dict]:
    """Per task, budget and schedule (the fields ``by``): the summary row of the lr with the lowest mean loss
    (infinite when every lr diverged), marked ``edge`` when that lr is the smallest or largest of the grid: the
    best may lie beyond it."""
    groups: dict[tuple, list[dict]] = {}
    for s in summary:
        groups.setdefault(tuple(s[k] for k in by), []).append(s)
    out = []
    for rows in groups.values():
        best = min(rows, key=lambda s: s["loss"])
        lrs = sorted(s["lr"] for s in rows)
        out.append({**best, "edge": len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])})
    return out


def best_phis(best: list[dict]) -> list[dict]:
    """Per task and budget: UBA's loss at each phi (each at its best lr) and the phi with the lowest."""
    names = {uba_name(phi): phi for phi in PHIS}
    cells: dict[tuple, dict[float, float]] = {}
    for b in best:
        if b["schedule"] in names:
            cells.setdefault((b["task"], b["budget"]), {})[names[b["schedule"]]] = b["loss"]
    out = []
    for (task, budget), losses in sorted(cells.items()):
        phi = min(losses, key=losses.get)
        out.append({"task": task, "budget": budget, "best_phi": phi, "loss_by_phi": {f"{k:g}": v for k, v in
                                                                                      sorted(losses.items())}})
    return out


def phi_correlations(phis: list[dict]) -> dict[str, float | None]:
    """Spearman's rank correlation of the best phi with the budget (over every task and budget), and with the
    condition number across the teacher tasks (over their budgets); None where too few cells vary."""
    from scipy.stats import spearmanr

    def rho(x, y):
        if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
            return None
        return float(spearmanr(x, y).statistic)

    teacher = [p for p in phis if p["task"].startswith("teacher-k")]
    return {"budget": rho([p["budget"] for p in phis], [p["best_phi"] for p in phis]),
            "kappa": rho([float(p["task"][len("teacher-k"):]) for p in teacher], [p["best_phi"] for p in teacher])}


def _cell(row: dict | None, metric: str, with_lr: bool, best: float) -> str:
    if row is None:
        return "-"
    v = row[metric]
    if not math.isfinite(v):
        return "diverged"
    text = f"{v:.4f} +- {row[metric + '_std']:.4f}"
    if with_lr:
        text += f" @{row['lr']:.3g}" + ("^" if row.get("edge") else "")
    return text + ("*" if v == best else "")


def format_tables(summary: list[dict], best: list[dict], phis: list[dict], fixed_lr: dict[str, float]) -> str:
    lines = []
    for task in sorted({s["task"] for s in summary}):
        budgets = sorted({s["budget"] for s in summary if s["task"] == task})
        metrics = ["loss"] + (["accuracy"] if any("accuracy" in s for s in summary if s["task"] == task) else [])
        views = [("at each schedule's best peak lr (@ lr; ^ at the grid's edge)", best, True)]
        fixed = [s for s in summary if s["task"] == task and s["lr"] == fixed_lr.get(task)]
        if fixed:
            views.append((f"at one fixed peak lr, {fixed_lr[task]:.3g}, for every schedule", fixed, False))
        for metric in metrics:
            for title, rows, with_lr in views:
                pick = min if metric == "loss" else max
                lines.append(f"\n{task}: held-out {metric} {title}; mean +- std over seeds, * best per budget")
                lines.append(f"{'schedule':20s}" + "".join(f"{'T=' + str(b):>28s}" for b in budgets))
                for sched in dict.fromkeys(r["schedule"] for r in summary):
                    cells = []
                    for b in budgets:
                        row = next((r for r in rows if (r["task"], r["budget"], r["schedule"]) == (task, b, sched)),
                                   None)
                        scores = [r[metric] for r in rows if (r["task"], r["budget"]) == (task, b)
                                  and math.isfinite(r[metric])]
                        cells.append(_cell(row, metric, with_lr, pick(scores) if scores else math.nan))
                    if any(c != "-" for c in cells):
                        lines.append(f"{sched:20s}" + "".join(f"{c:>28s}" for c in cells))
    if phis:
        lines.append("\nUBA's best phi per task and budget (each phi at its own best lr):")
        for task in sorted({p["task"] for p in phis}):
            cells = [f"T={p['budget']}: {p['best_phi']:g}" for p in phis if p["task"] == task]
            lines.append(f"  {task:16s} " + ", ".join(cells))
        corr = phi_correlations(phis)
        for what, r in corr.items():
            lines.append(f"  Spearman correlation of the best phi with {what}: " +
                         ("too few distinct values" if r is None else f"{r:+.2f}"))
    return "\n".join(lines)


def plot(best: list[dict], phis: list[dict], budgets: dict[str, list[int]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({b["task"] for b in best})
    fig, axes = plt.subplots(2, max(2, len(tasks)), figsize=(4.6 * max(2, len(tasks)), 8.0), squeeze=False)
    T = max(max(b) for b in budgets.values())
    t = torch.arange(T + T // 10)
    ax = axes[1][0]
    for name, make in SCHEDULES.items():
        ax.plot(t, make(T, warmup_of(T)).factor_tensor(t), label=name, lw=1.2,
                ls="-" if name.startswith("UBA") else "--")
    ax.set(title=f"lr factor, budget T={T}", xlabel="step")
    ax.legend(fontsize=6)
    for ax, task in zip(axes[0], tasks):
        for name in dict.fromkeys(b["schedule"] for b in best):
            pts = sorted((b["budget"], b["loss"], b["loss_std"]) for b in best
                         if b["task"] == task and b["schedule"] == name and math.isfinite(b["loss"]))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=name,
                            marker="o", ms=3, capsize=2, lw=1.1, ls="-" if name.startswith("UBA") else "--")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{task}: held-out loss at best lr", xlabel="step budget", ylabel="loss")
    axes[0][len(tasks) - 1].legend(fontsize=6)
    ax = axes[1][1]
    if phis:  # none without float32 rows (a precision study of 16-bit layouts only)
        for task in tasks:
            pts = [(p["budget"], p["best_phi"]) for p in phis if p["task"] == task]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=task)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set(title="UBA's best phi", xlabel="step budget", ylabel="phi")
        ax.legend(fontsize=6)
    else:
        ax.axis("off")
    for ax in axes[1][2:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m uba_fused.bench.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--schedules", nargs="+", choices=[*SCHEDULES, REFINED], default=list(SCHEDULES), metavar="NAME",
                    help=f"among: {', '.join([*SCHEDULES, REFINED])} (Refined runs Linear first)")
    ap.add_argument("--budgets", nargs="+", type=int, help="step budgets for every task (default per task: " +
                    "; ".join(f"{t.name} {' '.join(map(str, t.budgets))}" for t in TASKS.values()) + ")")
    ap.add_argument("--lrs", nargs="+", type=float, help="peak lrs for every task (default per task: its default "
                    f"lr times {', '.join(f'{g:g}' for g in GRID)}: " +
                    "; ".join(f"{t.name} {t.lr:g}" for t in TASKS.values()) + ")")
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["fp32"],
                    help="how the parameters and the optimizer state are kept (default: fp32)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1, help="multiply model width and data size (GPU runs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, help="processes that share the runs (default: one per core on a CPU, "
                    "1 on a GPU)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH")
    a = ap.parse_args(argv)
    if a.seeds < 1 or a.scale < 1 or (a.budgets and min(a.budgets) < 2):
        ap.error("--seeds and --scale must be >= 1, budgets >= 2")
    if a.lrs and min(a.lrs) <= 0:
        ap.error("--lrs must be positive")
    if a.workers is None:
        a.workers = (os.cpu_count() or 1) if torch.device(a.device).type == "cpu" else 1
    if a.workers < 1:
        ap.error("--workers must be >= 1")
    return sized(a)


def sized(a: argparse.Namespace) -> argparse.Namespace:
    """The models' and the data's sizes that the tasks read, from ``a.scale``."""
    a.width, a.layers, a.ctx, a.eval_batches, a.text_bytes = 32 * a.scale, 1, 32, 16, 1_000_000 * a.scale
    return a


def task_lrs(task: Task, a: argparse.Namespace) -> list[float]:
    return list(a.lrs) if a.lrs else [task.lr * g for g in GRID]


def main(argv=None) -> int:
    from tqdm import tqdm

    a = parse_args(argv)
    device = torch.device(a.device)
    budgets = {t: a.budgets or list(TASKS[t].budgets) for t in a.tasks}
    refine = REFINED in a.schedules
    first = [s for s in a.schedules if s != REFINED] + (["Linear"] if refine and "Linear" not in a.schedules else [])
    jobs = [Job(t, b, s, lr, seed, prec, record=refine and s == "Linear") for t in a.tasks for b in budgets[t]
            for s in first for prec in a.precisions for lr in task_lrs(TASKS[t], a) for seed in range(a.seeds)]
    t0 = time.time()
    runs = len(jobs) + sum(j.record for j in jobs)  # (each Linear run recording is followed by one Refined run)
    with tqdm(total=runs, desc="training runs", file=sys.stderr) as progress:
        results = run_all(jobs, a, progress)
        if refine:
            second = refined_jobs(results, jobs)
            results += run_all(second, a, progress)
            jobs += second
    for r in results:
        r.pop("grad_norms", None)  # (the tables' input, not a result)
    summary = summarize(results)
    best = best_lrs(summary)
    phis = best_phis(best)
    fixed_lr = {t: TASKS[t].lr for t in a.tasks if TASKS[t].lr in task_lrs(TASKS[t], a)}
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "uba_fused": uf.__version__, "workers": a.workers, "seconds": round(time.time() - t0, 1)}
    print(format_tables(summary, best, phis, fixed_lr))
    diverged = sum(not math.isfinite(r["loss"]) for r in results)
    print(f"\n{len(jobs)} runs ({diverged} diverged) in {env['seconds']:.0f} s on {env['device']} with {a.workers} "
          f"worker(s) (torch {env['torch']}, python {env['python']}; charlm text: this Python's stdlib)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "args": vars(a), "budgets": budgets,
                       "lrs": {t: task_lrs(TASKS[t], a) for t in a.tasks}, "fixed_lr": fixed_lr,
                       "summary": summary, "best": best, "phi": phis, "phi_correlation": phi_correlations(phis),
                       "runs": results}, f, indent=1)
    if a.plot:
        plot(best, phis, budgets, a.plot, f"uba_fused.AdamW, each schedule at its best peak lr, {a.seeds} seeds, "
                                          f"{env['device']}, {env['date'][:10]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
