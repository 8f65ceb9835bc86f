"""Optimizer-step throughput: uba_fused against torch.optim (and timm, if installed) in one run.

For every row: median time per ``step()`` over many steps after warm-up (CUDA events on a GPU,
wall clock on the CPU), the minimal bytes that step must move (read p, g and the state, write p and
the state, counted from the real tensors after warm-up; a master weight is state), GB/s, that rate as a
fraction of a copy measured in the same run (within GPU memory, or within host memory on the CPU),
speed-up against torch's fused AdamW (SGD rows: torch's fused SGD), host time per ``step()``, and the bytes per
parameter the step moves and the optimizer keeps. 16-bit parameter lists are timed in each precision layout
(``LAYOUTS``).
Gradients are new tensor objects before every step, as ``zero_grad(set_to_none=True)`` gives.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .. import backends, registry
from ..optim import LAMB, LARS, SGD, SGDP, AdaBelief, Adagrad, AdamP, AdamW, Adan, DiffGrad, Lion, SGDSaI
from ..schedules import UBA
from .presets import Preset

OURS = {"adamw": AdamW, "adabelief": AdaBelief, "lion": Lion, "sgd": SGD, "adan": Adan, "adagrad": Adagrad,
        "lars": LARS, "lamb": LAMB, "diffgrad": DiffGrad, "adamp": AdamP, "sgdp": SGDP, "sgd_sai": SGDSaI}
HYPER = {"adamw": dict(lr=1e-4, weight_decay=0.01), "adabelief": dict(lr=1e-4, weight_decay=0.01),
         "lion": dict(lr=1e-5, weight_decay=0.01), "sgd": dict(lr=1e-3, momentum=0.9),
         "adan": dict(lr=1e-4, weight_decay=0.01), "adagrad": dict(lr=1e-2, initial_accumulator_value=0.1),
         "lars": dict(lr=1.0, momentum=0.9, weight_decay=1e-4), "lamb": dict(lr=1e-3, weight_decay=0.01),
         "diffgrad": dict(lr=1e-4), "adamp": dict(lr=1e-4, weight_decay=0.01),
         "sgdp": dict(lr=1e-3, momentum=0.9, weight_decay=1e-4),
         "sgd_sai": dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)}


# How uba_fused keeps a parameter list (README: Precision layouts): the parameter dtypes each layout takes, and the
# options that choose it.
_LOW = (torch.bfloat16, torch.float16)
LAYOUTS: dict[str, tuple[tuple[torch.dtype, ...], dict]] = {
    "plain": ((torch.float32, *_LOW), {}),
    "bf16-state": ((torch.float32, torch.bfloat16), {"state_dtype": torch.bfloat16}),  # stochastic rounding
    "fp32-state": (_LOW, {"state_dtype": torch.float32}),
    "master": (_LOW, {"master_weights": "exact", "state_dtype": torch.float32}),
    "master-bf16-state": ((torch.bfloat16,), {"master_weights": "exact", "state_dtype": torch.bfloat16}),
    "master8": ((torch.bfloat16,), {"master_weights": "8bit", "state_dtype": torch.float32}),
    "master8-bf16-state": ((torch.bfloat16,), {"master_weights": "8bit", "state_dtype": torch.bfloat16}),
    "stochastic": (_LOW, {"master_weights": "stochastic", "state_dtype": torch.float32}),
    # 8-bit moments (blockwise, parameters of 4096 elements and more; stochastic rounding), and with the 8-bit master
    "8bit-state": ((torch.float32, torch.bfloat16), {"state_dtype": torch.int8}),
    "master8-8bit-state": ((torch.bfloat16,), {"master_weights": "8bit", "state_dtype": torch.int8}),
}


def layouts_for(dtype: torch.dtype, requested: list[str] | None = None) -> list[str]:
    """The layouts a list of ``dtype`` parameters can take (of ``requested``; None: all)."""
    return [name for name in requested or LAYOUTS if dtype in LAYOUTS[name][0]]


class ObviousForeach(torch.optim.Optimizer):
    """Lion and AdaBelief as a user would write them with torch._foreach_* ops, the baseline that backend
    "cpu" must not be slower than on a CPU (no fused torch kernel exists for either)."""

    def __init__(self, params, rule: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-16,
                 weight_decay: float = 0.0):
        self.rule = rule
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            gs = [p.grad for p in ps]
            for p in ps:
                if not self.state[p]:  # Lion keeps one moment
                    self.state[p] = {"step": 0, "m": torch.zeros_like(p)}
                    if self.rule != "lion":
                        self.state[p]["v"] = torch.zeros_like(p)
                self.state[p]["step"] += 1
            m = [self.state[p]["m"] for p in ps]
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            torch._foreach_mul_(ps, 1 - lr * wd)
            if self.rule == "lion":
                u = torch._foreach_lerp(m, gs, 1 - b1)
                torch._foreach_add_(ps, torch._foreach_sign(u), alpha=-lr)
                torch._foreach_lerp_(m, gs, 1 - b2)
                continue
            v, k = [self.state[p]["v"] for p in ps], [self.state[p]["step"] for p in ps]
            torch._foreach_lerp_(m, gs, 1 - b1)
            r = torch._foreach_sub(gs, m)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, r, r, value=1 - b2)
            torch._foreach_add_(v, group["eps"])
            denom = torch._foreach_div(torch._foreach_sqrt(v), [(1 - b2**i) ** 0.5 for i in k])
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(ps, m, denom, [-lr / (1 - b1**i) for i in k])


@dataclass
class Candidate:
    name: str
    rule: str                      # what it computes, for the bytes it must move
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    compiled: bool = False         # time torch.compile(step), report compile time apart
    layout: str = "plain"          # LAYOUTS


@dataclass
class Row:
    preset: str
    dtype: str
    name: str
    rule: str
    tensors: int
    numel: int
    bytes_per_step: int
    ms: float
    ms_p10: float
    ms_p90: float
    gbps: float
    frac_copy: float
    host_us: float
    speedup_vs_torch_fused: float | None = None
    compile_s: float | None = None
    layout: str = "plain"
    bytes_per_param: float = 0.0        # moved by a step: bytes_per_step / numel
    state_bytes_per_param: float = 0.0  # kept by the optimizer between steps (its state, masters included)

    def as_dict(self) -> dict:
        return asdict(self)


def candidates(device: torch.device, optimizers: list[str], ours: list[str], torch_rows: bool,
               layouts: list[str] = ("plain",)) -> list[Candidate]:
    """The rows to measure: each of our optimizers on each usable backend in each of ``layouts``, then what users
    pick instead."""
    out = []
    for rule in optimizers:
        for backend in ours:
            for layout in layouts:
                out.append(Candidate(f"uba_fused.{OURS[rule].__name__} [{backend}]" +
                                     ("" if layout == "plain" else f" {layout}"), rule,
                                     lambda ps, r=rule, b=backend, lay=layout: OURS[r](
                                         ps, **HYPER[r], backend=b, schedule=UBA(10_000, phi=1.0), **LAYOUTS[lay][1]),
                                     layout=layout))
    if not torch_rows:
        return out
    cuda = device.type == "cuda"
    if "adamw" in optimizers:
        h = HYPER["adamw"]
        out += [Candidate("torch AdamW for-loop", "adamw", lambda ps: torch.optim.AdamW(ps, **h, foreach=False)),
                Candidate("torch AdamW foreach", "adamw", lambda ps: torch.optim.AdamW(ps, **h, foreach=True)),
                Candidate("torch AdamW fused", "adamw", lambda ps: torch.optim.AdamW(ps, **h, fused=True))]
        if cuda:
            out += [Candidate("torch AdamW fused capturable, tensor lr", "adamw",
                              lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(h["lr"], device=device),
                                                           weight_decay=h["weight_decay"], fused=True,
                                                           capturable=True)),
                    Candidate("torch.compile AdamW step (foreach, tensor lr)", "adamw",
                              lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(h["lr"], device=device),
                                                           weight_decay=h["weight_decay"], foreach=True,
                                                           capturable=True), compiled=True)]
    if "sgd" in optimizers:
        out.append(Candidate("torch SGD momentum fused", "sgd",
                             lambda ps: torch.optim.SGD(ps, **HYPER["sgd"], fused=True)))
    if "adagrad" in optimizers:  # torch's fused Adagrad runs on CPUs only
        how = {"foreach": True} if cuda else {"fused": True}
        out.append(Candidate(f"torch Adagrad {next(iter(how))}", "adagrad",
                             lambda ps: torch.optim.Adagrad(ps, **HYPER["adagrad"], **how)))
    if not cuda:
        for rule in ("lion", "adabelief"):
            if rule in optimizers:
                out.append(Candidate(f"foreach {OURS[rule].__name__} (obvious)", rule,
                                     lambda ps, r=rule: ObviousForeach(ps, r, **HYPER[r])))
    try:
        import timm.optim as timm_optim  # optional: never required
    except ImportError:
        timm_optim = None
    if timm_optim is not None:
        if "lion" in optimizers:
            out.append(Candidate("timm Lion", "lion", lambda ps: timm_optim.Lion(ps, **HYPER["lion"])))
        if "adabelief" in optimizers:
            out.append(Candidate("timm AdaBelief", "adabelief",
                                 lambda ps: timm_optim.AdaBelief(ps, **HYPER["adabelief"], rectify=False)))
        if "lars" in optimizers:
            out.append(Candidate("timm Lars", "lars", lambda ps: timm_optim.Lars(ps, **HYPER["lars"])))
        if "lamb" in optimizers:
            out.append(Candidate("timm Lamb", "lamb", lambda ps: timm_optim.Lamb(ps, **HYPER["lamb"])))
        for rule, name in (("adamp", "AdamP"), ("sgdp", "SGDP")):
            if rule in optimizers:
                out.append(Candidate(f"timm {name}", rule, lambda ps, r=rule, n=name: getattr(timm_optim, n)(
                    ps, **HYPER[r])))
    return out


class Timer:
    """Per-step device time (CUDA events, or wall clock on the CPU) and host time of the call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def run(self, fn: Callable[[], None], before: Callable[[], None], steps: int) -> tuple[list[float], list[float]]:
        host, events = [], []
        for _ in range(steps):
            before()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            if self.cuda:
                end.record()
                events.append((start, end))
            else:
                events.append(host[-1] / 1e3)
        if self.cuda:
            torch.cuda.synchronize()
            device_ms = [s.elapsed_time(e) for s, e in events]
        else:
            device_ms = events
        return device_ms, host


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = Timer(device)
    ms, _ = timer.run(lambda: dst.copy_(src), lambda: None, repeats + 2)
    return 2 * nbytes / (statistics.median(ms[2:]) * 1e-3) / 1e9


def measure(preset: Preset, dtype: torch.dtype, device: torch.device, cands: list[Candidate], steps: int,
            warmup: int, copy_gbps: float, progress=None, seed: int = 0) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, device=device, dtype=dtype, generator=gen).mul_(0.02).requires_grad_()
              for s in preset.shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in preset.shapes]
    numel = preset.numel
    timer = Timer(device)

    def fresh_grads():  # new tensor objects at the same addresses, as the caching allocator gives
        for p, g in zip(params, grads):
            p.grad = g.detach()

    rows = []
    for cand in cands:
        compile_s = None
        try:
            opt = cand.make(params)
        except (RuntimeError, ValueError, TypeError) as exc:  # e.g. fused torch optimizers on this device
            if progress:
                progress.write(f"skipped {cand.name}: {exc}")
            continue
        step = opt.step
        if cand.compiled:
            step = torch.compile(opt.step)
            fresh_grads()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
        timer.run(step, fresh_grads, warmup)
        ms, host = timer.run(step, fresh_grads, steps)
        med = statistics.median(ms)
        nbytes, kept = bytes_of(opt, params, grads, cand.rule)
        gbps = nbytes / (med * 1e-3) / 1e9
        qs = statistics.quantiles(ms, n=10) if len(ms) > 1 else [med] * 9
        rows.append(Row(preset.name, str(dtype).replace("torch.", ""), cand.name, cand.rule, len(preset.shapes),
                        numel, nbytes, med, qs[0], qs[-1], gbps, gbps / copy_gbps, statistics.median(host),
                        compile_s=compile_s, layout=cand.layout, bytes_per_param=nbytes / numel,
                        state_bytes_per_param=kept / numel))
        del opt, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            progress.update(1)
    _speedups(rows)
    return rows


def _speedups(rows: list[Row]) -> None:
    ref = {r.rule: r.ms for r in rows if r.name in ("torch AdamW fused", "torch SGD momentum fused")}
    for r in rows:
        base = ref.get("sgd") if r.rule == "sgd" else ref.get("adamw")
        r.speedup_vs_torch_fused = base / r.ms if base and r.ms > 0 else None


def usable_backends(device: torch.device, dtype: torch.dtype, requested: list[str] | None) -> list[str]:
    avail = backends.availability(device, [dtype])
    names = requested or [n for n in ("cuda", "triton", "cpu", "torch") if avail[n] is None]
    if device.type == "cpu":  # the Triton interpreter is a test tool, not something to time
        names = [n for n in names if n in ("cpu", "torch")]
    return [n for n in names if avail[n] is None]


def format_table(rows: list[Row]) -> str:
    head = f"{'preset':12s} {'dtype':8s} {'step':46s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s} {'vs fused':>9s} " \
           f"{'host us':>8s} {'B/param':>8s} {'kept B':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r.speedup_vs_torch_fused:.2f}x" if r.speedup_vs_torch_fused else "-"
        extra = f"  (compile {r.compile_s:.0f} s)" if r.compile_s is not None else ""
        lines.append(f"{r.preset:12s} {r.dtype:8s} {r.name:46s} {r.ms:9.3f} {r.gbps:8.1f} {r.frac_copy:8.2f} "
                     f"{sp:>9s} {r.host_us:8.0f} {r.bytes_per_param:8.1f} {r.state_bytes_per_param:7.1f}{extra}")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str, copy: str = "device-to-device copy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r.preset, r.dtype) for r in rows})
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 0.45 * len(rows) + 1.5 * len(keys)), squeeze=False)
    for ax, (preset, dt) in zip(axes[:, 0], keys):
        sel = [r for r in rows if (r.preset, r.dtype) == (preset, dt)]
        colors = ["tab:blue" if r.name.startswith("uba_fused") else "tab:gray" for r in sel]
        ax.barh([r.name for r in sel], [r.frac_copy for r in sel], color=colors)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.invert_yaxis()
        ax.set_xlabel(f"minimal bytes moved per second / {copy} bandwidth")
        ax.set_title(f"{preset}, {dt}")
        for i, r in enumerate(sel):
            ax.text(r.frac_copy, i, f" {r.ms:.2f} ms", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (from /proc/cpuinfo where there is one) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def copy_label(device: torch.device) -> str:
    """What the copy baseline measured: a copy within GPU memory, or within host memory on the CPU."""
    return "device-to-device copy" if device.type == "cuda" else "host memory copy (CPU)"


def copy_size(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(min(2 * 2**30, free // 8))
    return 256 * 2**20


def bytes_of(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor],
             rule: str) -> tuple[int, int]:
    """(bytes a step must move, bytes the optimizer keeps), from the real tensors: every rule reads the parameter, its
    gradient and each state buffer once and writes the parameter and each buffer once (a master weight is one
    more buffer), and a rule's per-tensor norms (Rule.reduces) read the parameter and the gradient once more (LARS),
    or everything the update reads (LAMB's, AdamP's and SGDP's direction); the step counts and a rule's per-tensor
    value (Rule.scalar: SGD-SaI's g-SNR, kept but not streamed) are not counted, nor SGD-SaI's measuring pre-pass,
    which runs at a tensor's first step only."""
    spec = registry.RULES[rule]
    kept = sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k != "step" and torch.is_tensor(v))
    streamed = kept - sum(st[spec.scalar].nbytes for st in opt.state.values() if spec.scalar in st)
    reduces = () if spec.measures else spec.reduces
    norms = sum(p.nbytes * ("param" in reduces) + g.nbytes * bool(reduces) for p, g in zip(params, grads))
    norms += streamed if spec.reduces_direction else 0
    return sum(2 * p.nbytes + g.nbytes for p, g in zip(params, grads)) + 2 * streamed + norms, kept


def bytes_per_element(rule: str, dtype: torch.dtype) -> int:
    return registry.RULES[rule].bytes_per_element(dtype.itemsize)

