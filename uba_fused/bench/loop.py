"""``python -m uba_fused.bench.loop``: the training loop users run, timed, with each optimizer.

A GPT-like byte-level model (bench.train's CharLM) learns this Python's own standard-library sources:
``zero_grad(set_to_none=True)``, forward and loss under bf16 autocast (on a GPU), ``backward()``,
``step()``, every iteration, in two sizes:
  host  a small model and batch: the host's work per iteration decides the speed
  gpu   a GPT-2-small-like model and a large batch: the GPU's work decides it
and, without a GPU, a tiny eager-only one on the CPU (what CI runs).

Rows (each one its own model, from the same initial weights, fed the same batches):
  torch AdamW fused + LambdaLR          eager; the LambdaLR gives the UBA schedule on the host
  uba_fused AdamW [cuda|triton]         eager; the UBA schedule runs in the kernel
  torch AdamW capturable, graphed       the whole iteration in one CUDA graph (PyTorch's recipe); its lr
                                        tensor is filled by the LambdaLR after every replay
  uba_fused AdamW [...], graphed        the whole iteration in one CUDA graph; nothing to do between replays
                                        but feed the next batch
  uba_fused AdamW [...], compiled       torch.compile(train_step), mode="reduce-overhead" on a GPU: forward,
                                        backward, step() (the op uba_fused::step) and zero_grad() in one graph,
                                        which Inductor's CUDA graphs replay (--compile-backend chooses the
                                        compiler; on the CPU, the default mode)
Columns: ms per iteration (iterations back to back, the host running ahead; CUDA events around a
round), tokens/s, the optimizer's kernels' GPU time per iteration (torch.profiler, in a separate pass:
idle gaps cannot inflate it), host time of the optimizer's part of an iteration (step(), or the
scheduler's fill between replays), and the loss of the last iteration, so that graph == eager shows.
Rows are interleaved over rounds; the table gives medians and the spread (min-max) over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import uba_fused as uf

from .throughput import device_name
from .train import CharData, CharLM

SIZES = {  # d, layers, heads, ctx, batch
    "host": (512, 8, 8, 128, 8),       # 25M parameters, 1K tokens per iteration
    "gpu": (768, 12, 12, 512, 32),     # 85M parameters, 16K tokens per iteration
    "tiny": (32, 1, 2, 16, 4),         # the CPU's
}
LR, WEIGHT_DECAY, WARMUP_ITERS = 1e-3, 0.1, 3
# The optimizer's kernels, by name, in a torch.profiler trace: uba_fused's CUDA and Triton kernels, torch's
# fused AdamW (a multi_tensor_apply functor) and its lr math.
OPTIMIZER_KERNELS = ("fused_step_kernel", "_step_kernel", "FusedAdam", "fused_adam", "_fused_adamw")


@dataclass
class Row:
    size: str
    name: str
    ms: list[float] = field(default_factory=list)         # per round
    host_us: list[float] = field(default_factory=list)    # per optimizer call
    optimizer_gpu_ms: float | None = None
    final_loss: float | None = None
    tokens_per_iter: int = 0

    def summary(self) -> dict:
        med = statistics.median(self.ms)
        return {"size": self.size, "name": self.name, "ms": med, "ms_min": min(self.ms), "ms_max": max(self.ms),
                "tokens_per_s": self.tokens_per_iter / (med * 1e-3),
                "host_us": statistics.median(self.host_us) if self.host_us else None,
                "optimizer_gpu_ms": self.optimizer_gpu_ms, "final_loss": self.final_loss, "rounds": len(self.ms)}


class Run:
    """One row's model, optimizer and iteration; ``iterate(t)`` runs iteration t on batch t."""

    def __init__(self, kind: str, backend: str | None, mode: str, size: str, batches: torch.Tensor,
                 total: int, device: torch.device, seed: int, compile_backend: str = "inductor"):
        d, layers, heads, ctx, _ = SIZES[size]
        torch.manual_seed(seed)  # the same initial weights in every row
        self.model = CharLM(d, layers, heads, ctx).to(device)
        graphed = mode == "graphed"
        self.batches, self.device, self.mode = batches, device, mode
        self.schedule = uf.UBA(total, phi=1.0, warmup_steps=max(1, total // 20))
        params = list(self.model.parameters())
        if kind == "torch":
            cuda = device.type == "cuda"
            lr = torch.tensor(LR, device=device) if graphed else LR
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY, fused=True,
                                         capturable=graphed and cuda)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.schedule.factor)
        else:
            self.opt = uf.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, schedule=self.schedule, backend=backend)
            self.sched = None
        self.static = batches[0].clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compiled = None
        if mode == "compiled":
            cuda = device.type == "cuda"
            self.compiled = torch.compile(self._train_step, backend=compile_backend,
                                          **({"mode": "reduce-overhead"} if cuda and compile_backend == "inductor"
                                             else {}))
        self.loss: torch.Tensor | None = None
        self.host_us: list[float] = []

    def _autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # no cache: graph capture

    def _forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        return loss.detach()

    def _train_step(self, batch: torch.Tensor) -> torch.Tensor:
        """The compiled row's iteration: one graph where Dynamo traces backward (``trace_autograd_ops``, set by
        ``_traced``), else two (forward; backward's end, the step and zero_grad), backward AOT-compiled between."""
        loss = self._forward_backward(batch)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def _eager(self, t: int) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self._forward_backward(self.batches[t])
        t0 = time.perf_counter()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.host_us.append((time.perf_counter() - t0) * 1e6)
        return loss

    def warm_up(self) -> int:
        """Iterations 0 .. WARMUP_ITERS-1 eagerly (on a side stream if graphed: PyTorch's recipe), then the
        capture; compiled: iteration 0 eagerly (the state), the rest compiled (the compile, and reduce-overhead's
        warm-up and recording); returns the next iteration's index."""
        if self.compiled is not None:
            self.loss = self._eager(0)
            self.opt.zero_grad(set_to_none=True)
            for t in range(1, WARMUP_ITERS):
                with _traced():
                    self.loss = self.compiled(self.batches[t])
            self.host_us = []
            return WARMUP_ITERS
        if self.mode != "graphed":
            for t in range(WARMUP_ITERS):
                self.loss = self._eager(t)
            self.host_us = []
            return WARMUP_ITERS
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for t in range(WARMUP_ITERS):
                self.loss = self._eager(t)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward(self.static)
            self.opt.step()
        self.host_us = []
        return WARMUP_ITERS

    def iterate(self, t: int) -> None:
        if self.compiled is not None:
            with _traced():
                self.loss = self.compiled(self.batches[t])
            return
        if self.graph is None:
            self.loss = self._eager(t)
            return
        self.static.copy_(self.batches[t])
        self.graph.replay()
        if self.sched is not None:  # torch's lr lives on the host: fill the tensor for the next replay
            t0 = time.perf_counter()
            self.sched.step()
            self.host_us.append((time.perf_counter() - t0) * 1e6)


def _traced() -> contextlib.AbstractContextManager:
    """Dynamo traces ``loss.backward()`` into the graph where it can (torch >= 2.11's ``trace_autograd_ops``)."""
    import torch._dynamo
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(trace_autograd_ops=True)


def rows_for(device: torch.device) -> list[tuple[str, str, str | None, str]]:
    """(name, kind, backend, mode) of every row this device can run; mode: "eager", "graphed" or "compiled"."""
    if device.type != "cuda":
        return [("torch AdamW fused + LambdaLR", "torch", None, "eager"),
                ("uba_fused AdamW [torch]", "uba", "torch", "eager"),
                ("uba_fused AdamW [torch], compiled", "uba", "torch", "compiled")]
    avail = uf.backends.availability(device)
    kernels = [b for b in ("cuda", "triton") if avail[b] is None]
    rows = [("torch AdamW fused + LambdaLR", "torch", None, "eager")]
    rows += [(f"uba_fused AdamW [{b}]", "uba", b, "eager") for b in kernels]
    rows += [("torch AdamW capturable, graphed", "torch", None, "graphed")]
    rows += [(f"uba_fused AdamW [{b}], graphed", "uba", b, "graphed") for b in kernels]
    rows += [(f"uba_fused AdamW [{b}], compiled", "uba", b, "compiled") for b in kernels]
    return rows


def optimizer_gpu_ms(run: Run, start: int, iters: int) -> float:
    """GPU time of the optimizer's kernels per iteration, from a torch.profiler trace of ``iters`` iterations."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for t in range(start, start + iters):
            run.iterate(t)
        torch.cuda.synchronize()
    total_us = 0.0
    for evt in prof.key_averages():
        if any(k in evt.key for k in OPTIMIZER_KERNELS):
            total_us += getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
    return total_us / 1e3 / iters


def measure(size: str, device: torch.device, rounds: int, iters: int, profile_iters: int, seed: int,
            text_bytes: int, progress=None, compile_backend: str = "inductor") -> list[Row]:
    d, layers, heads, ctx, batch = SIZES[size]
    text = CharData(text_bytes, ctx, torch.device("cpu")).train
    total = WARMUP_ITERS + rounds * iters + profile_iters
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(text) - ctx - 1, (total, batch, 1), generator=gen)
    batches = text[starts + torch.arange(ctx + 1)].to(device)  # every batch, before timing: no copy in the loop
    specs = rows_for(device)
    runs, rows = [], []
    for name, kind, backend, mode in specs:
        run = Run(kind, backend, mode, size, batches, total, device, seed, compile_backend)
        run.warm_up()
        runs.append(run)
        rows.append(Row(size, name, tokens_per_iter=batch * ctx))
    t = WARMUP_ITERS
    for _ in range(rounds):  # rows interleaved: a slow spell of the machine hits them all alike
        for run, row in zip(runs, rows):
            _sync(device)
            t0 = time.perf_counter()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            for i in range(iters):
                run.iterate(t + i)
            if device.type == "cuda":
                end.record()
                end.synchronize()
                row.ms.append(start.elapsed_time(end) / iters)
            else:
                row.ms.append((time.perf_counter() - t0) * 1e3 / iters)
            if progress is not None:
                progress.update(1)
        t += iters
    for run, row in zip(runs, rows):
        if device.type == "cuda" and profile_iters:
            row.optimizer_gpu_ms = optimizer_gpu_ms(run, t, profile_iters)
        else:
            for i in range(profile_iters):
                run.iterate(t + i)
        row.host_us = run.host_us
        row.final_loss = float(run.loss)
        del run
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def format_table(summaries: list[dict]) -> str:
    head = (f"{'size':5s} {'optimizer':36s} {'ms/iter':>9s} {'(min-max)':>15s} {'tokens/s':>10s} {'opt GPU ms':>10s} "
            f"{'host us':>8s} {'final loss':>11s}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        gpu = f"{s['optimizer_gpu_ms']:.3f}" if s["optimizer_gpu_ms"] is not None else "-"
        host = f"{s['host_us']:.0f}" if s["host_us"] is not None else "-"
        lines.append(f"{s['size']:5s} {s['name']:36s} {s['ms']:9.3f} {s['ms_min']:7.3f}-{s['ms_max']:<7.3f} "
                     f"{s['tokens_per_s']:10.0f} {gpu:>10s} {host:>8s} {s['final_loss']:11.6f}")
    return "\n".join(lines)


def plot(summaries: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(s["size"] for s in summaries))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 0.5 * len(summaries) + 2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        sel = [s for s in summaries if s["size"] == size]
        y = range(len(sel))
        ax.barh(list(y), [s["ms"] for s in sel], xerr=[[s["ms"] - s["ms_min"] for s in sel],
                                                        [s["ms_max"] - s["ms"] for s in sel]],
                color=["tab:blue" if s["name"].startswith("uba_fused") else "tab:gray" for s in sel], capsize=3)
        ax.set_yticks(list(y), [s["name"] for s in sel])
        ax.invert_yaxis()
        ax.set(xlabel="ms per iteration (median over rounds; min-max)", title=f"size {size}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m uba_fused.bench.loop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="default: host gpu on a GPU, tiny on the CPU")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, help="timed iterations per row and round (default 20 on a GPU, 3 on the CPU)")
    ap.add_argument("--profile-iters", type=int, help="iterations profiled for the optimizer's GPU time "
                    "(default 5 on a GPU, 0 on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend for the compiled rows (inductor: reduce-overhead on a GPU)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH")
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.sizes = a.sizes or (["host", "gpu"] if gpu else ["tiny"])
    a.iters = a.iters or (20 if gpu else 3)
    a.profile_iters = (5 if gpu else 0) if a.profile_iters is None else a.profile_iters
    if a.rounds < 1 or a.iters < 1 or a.profile_iters < 0:
        ap.error("--rounds and --iters must be >= 1, --profile-iters >= 0")
    if not gpu and "tiny" not in a.sizes:
        print("note: sizes host and gpu on the CPU take long; the graphed rows need a GPU", file=sys.stderr)
    return a


def main(argv=None) -> int:
    from tqdm import tqdm

    a = parse_args(argv)
    device = torch.device(a.device)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "uba_fused": uf.__version__}
    summaries = []
    n = len(rows_for(device)) * len(a.sizes) * a.rounds
    with tqdm(total=n, desc="timing loops", file=sys.stderr) as bar:
        for size in a.sizes:
            bar.set_postfix_str(size)
            text = 2_000_000 if size != "tiny" else 200_000
            rows = measure(size, device, a.rounds, a.iters, a.profile_iters, a.seed, text, progress=bar,
                           compile_backend=a.compile_backend)
            summaries += [r.summary() for r in rows]
    print(format_table(summaries))
    print(f"\n{env['device']}, torch {env['torch']}, {env['date'][:10]}; {a.rounds} rounds x {a.iters} iterations per "
          f"row, interleaved; ms/iter from {'CUDA events' if device.type == 'cuda' else 'wall clock'}, back to back")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "args": vars(a), "rows": summaries}, f, indent=1)
    if a.plot:
        plot(summaries, a.plot, f"training loop, {env['device']}, torch {env['torch']}, {env['date'][:10]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
