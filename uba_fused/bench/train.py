"""``python -m uba_fused.bench.train``: budgeted training with UBA against the usual schedules.

Two tasks on data that needs no download:
  charlm  a small character-level transformer language model on this Python's own standard-library
          sources (bytes as tokens; the last 10% of the text is held out)
  digits  a small convolutional classifier on scikit-learn's bundled 8x8 digits (a fixed 20% held out)

For each step budget, every schedule trains the same model from the same seeds with the same
optimizer (uba_fused.AdamW) and peak lr; the table reports the final held-out loss (and accuracy)
as mean +- standard deviation over the seeds. Defaults finish in minutes on a CPU; --scale, --budgets
and --device take it to a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import uba_fused as uf

from .throughput import device_name

SCHEDULES = {
    "UBA phi=0.5": lambda T, W: uf.UBA(T, phi=0.5, warmup_steps=W),
    "UBA phi=1": lambda T, W: uf.UBA(T, phi=1.0, warmup_steps=W),
    "UBA phi=2 (=cosine)": lambda T, W: uf.UBA(T, phi=2.0, warmup_steps=W),
    "Cosine": lambda T, W: uf.Cosine(T, warmup_steps=W),
    "Linear": lambda T, W: uf.Linear(T, warmup_steps=W),
    "REX": lambda T, W: uf.REX(T, warmup_steps=W),
    "Constant": lambda T, W: uf.Constant(warmup_steps=W),
}


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


# ------------------------------------------------------------------ runs
def run_charlm(data: CharData, budget: int, sched_name: str, seed: int, a) -> dict:
    torch.manual_seed(seed)
    model = CharLM(a.width, a.layers, 4, a.ctx).to(data.device)
    opt = uf.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1,
                   schedule=SCHEDULES[sched_name](budget, max(1, budget // 20)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(budget):
        x, y = data.batch("train", a.batch, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    vgen, losses = torch.Generator().manual_seed(999), []
    with torch.no_grad():
        for _ in range(a.eval_batches):
            x, y = data.batch("val", a.batch, vgen)
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return {"loss": statistics.fmean(losses)}


def run_digits(data: DigitsData, budget: int, sched_name: str, seed: int, a) -> dict:
    torch.manual_seed(seed)
    model = digits_cnn(a.width // 4).to(data.device)
    opt = uf.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01,
                   schedule=SCHEDULES[sched_name](budget, max(1, budget // 20)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(budget):
        x, y = data.batch(a.batch, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(data.xte)
        return {"loss": F.cross_entropy(logits, data.yte).item(),
                "accuracy": (logits.argmax(1) == data.yte).float().mean().item()}


TASKS = {"charlm": run_charlm, "digits": run_digits}
DEFAULT_BUDGETS = {"charlm": [100, 200, 400], "digits": [60, 120, 240]}


def summarize(results: list[dict]) -> list[dict]:
    keys = sorted({(r["task"], r["budget"], r["schedule"]) for r in results},
                  key=lambda k: (k[0], k[1], list(SCHEDULES).index(k[2])))
    out = []
    for task, budget, sched in keys:
        rs = [r for r in results if (r["task"], r["budget"], r["schedule"]) == (task, budget, sched)]
        row = {"task": task, "budget": budget, "schedule": sched, "seeds": len(rs)}
        for metric in ("loss", "accuracy"):
            vals = [r[metric] for r in rs if metric in r]
            if vals:
                row[metric] = statistics.fmean(vals)
                row[metric + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def format_table(summary: list[dict]) -> str:
    lines = []
    for task in sorted({s["task"] for s in summary}):
        budgets = sorted({s["budget"] for s in summary if s["task"] == task})
        metrics = ["loss"] + (["accuracy"] if any("accuracy" in s for s in summary if s["task"] == task) else [])
        for metric in metrics:
            lines.append(f"\n{task}: held-out {metric}, mean +- std over seeds (best per budget marked *)")
            lines.append(f"{'schedule':22s}" + "".join(f"{'T=' + str(b):>20s}" for b in budgets))
            best = {}
            for b in budgets:
                vals = [s[metric] for s in summary if s["task"] == task and s["budget"] == b]
                best[b] = (min if metric == "loss" else max)(vals)
            for sched in SCHEDULES:
                cells = []
                for b in budgets:
                    s = next((s for s in summary if (s["task"], s["budget"], s["schedule"]) == (task, b, sched)), None)
                    if s is None:
                        cells.append(f"{'-':>20s}")
                        continue
                    mark = "*" if s[metric] == best[b] else " "
                    cells.append(f"{s[metric]:>11.4f} +- {s[metric + '_std']:.4f}{mark}")
                if any(c.strip() != "-" for c in cells):
                    lines.append(f"{sched:22s}" + "".join(cells))
    return "\n".join(lines)


def plot(summary: list[dict], budgets: dict[str, list[int]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(5.2 * (1 + len(tasks)), 4.2))
    T = max(max(b) for b in budgets.values())
    t = torch.arange(T + T // 10)
    for name, make in SCHEDULES.items():
        axes[0].plot(t, make(T, max(1, T // 20)).factor_tensor(t), label=name, lw=1.3,
                     ls="-" if name.startswith("UBA") else "--")
    axes[0].set(title=f"lr factor, budget T={T}", xlabel="step")
    axes[0].legend(fontsize=7)
    for ax, task in zip(axes[1:], tasks):
        for name in SCHEDULES:
            pts = sorted((s["budget"], s["loss"], s["loss_std"]) for s in summary
                         if s["task"] == task and s["schedule"] == name)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=name,
                            marker="o", ms=3, capsize=2, lw=1.2, ls="-" if name.startswith("UBA") else "--")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{task}: held-out loss vs budget", xlabel="step budget", ylabel="loss")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m uba_fused.bench.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    ap.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES), metavar="NAME",
                    help=f"among: {', '.join(SCHEDULES)}")
    ap.add_argument("--budgets", nargs="+", type=int, help="step budgets (default: charlm 100 200 400, digits "
                    "60 120 240)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=1, help="multiply model width and data size (GPU runs)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, the same for every schedule")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH")
    a = ap.parse_args(argv)
    if a.seeds < 1 or a.scale < 1 or (a.budgets and min(a.budgets) < 2):
        ap.error("--seeds and --scale must be >= 1, budgets >= 2")
    a.width, a.layers, a.ctx, a.eval_batches, a.text_bytes = 64 * a.scale, 2, 64, 16, 2_000_000 * a.scale
    return a


def main(argv=None) -> int:
    from tqdm import tqdm

    a = parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = {}
    if "charlm" in a.tasks:
        data["charlm"] = CharData(a.text_bytes, a.ctx, device)
    if "digits" in a.tasks:
        data["digits"] = DigitsData(device)
    budgets = {t: a.budgets or DEFAULT_BUDGETS[t] for t in a.tasks}
    jobs = [(t, b, s, seed) for t in a.tasks for b in budgets[t] for s in a.schedules for seed in range(a.seeds)]
    results, t0 = [], time.time()
    for task, budget, sched, seed in tqdm(jobs, desc="training runs", file=sys.stderr):
        r = TASKS[task](data[task], budget, sched, seed, a)
        results.append({"task": task, "budget": budget, "schedule": sched, "seed": seed, **r})
    summary = summarize(results)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device),
           "torch": torch.__version__, "python": platform.python_version(), "uba_fused": uf.__version__,
           "seconds": round(time.time() - t0, 1)}
    print(format_table(summary))
    print(f"\n{len(jobs)} runs in {env['seconds']:.0f} s on {env['device']} (torch {env['torch']}, "
          f"python {env['python']}; charlm text: this Python's stdlib)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "args": vars(a), "summary": summary, "runs": results}, f, indent=1)
    if a.plot:
        plot(summary, budgets, a.plot, f"uba_fused.AdamW, peak lr {a.lr}, {a.seeds} seeds, {env['device']}, "
                                        f"{env['date'][:10]}")
    assert all(math.isfinite(r["loss"]) for r in results), "a run diverged (non-finite loss)"
    return 0


if __name__ == "__main__":
    sys.exit(main())
