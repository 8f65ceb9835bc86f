"""The declarative test config (optimizer cases, schedules, dtypes, tolerances) and shared helpers."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import uba_fused as uf

import oracle


@dataclass(frozen=True)
class Case:
    id: str
    cls: type
    rule: str
    kwargs: dict = field(default_factory=dict)

    def make(self, params, **extra):
        return self.cls(params, **{**self.kwargs, **extra})

    def hyper(self, group: dict) -> dict:
        return {k: v for k, v in group.items()
                if k not in ("params", "schedule", "backend", "schedule_step", "lr", "state_dtype", "max_grad_norm")}

    def grad_scale(self, grads: list) -> float:
        """The factor the step scales every gradient by (clipping by the global norm, as Adan's reference)."""
        max_norm = self.kwargs.get("max_grad_norm", 0.0)
        if not max_norm:
            return 1.0
        norm = np.sqrt(sum((f64(g) ** 2).sum() for g in grads if g is not None))
        # torch's clip_grad_norm_'s 1e-6; Adan's reference its own eps; timm's Lamb none (Rule.clip_eps)
        eps = uf.registry.RULES[self.rule].clip_eps(self.kwargs)
        return min(1.0, max_norm / (norm + eps))


# Hyper-parameters far from the defaults where a default would hide a term: a large eps makes the eps
# placement visible, weight decay is non-zero, betas are not the usual ones.
CASES = [
    Case("adamw", uf.AdamW, "adamw", dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)),
    Case("adamw-defaults", uf.AdamW, "adamw"),
    Case("adabelief", uf.AdaBelief, "adabelief", dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-5, weight_decay=0.1)),
    Case("lion", uf.Lion, "lion", dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)),
    Case("sgd", uf.SGD, "sgd", dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1)),
    Case("sgd-nesterov", uf.SGD, "sgd", dict(lr=1e-2, momentum=0.8, nesterov=True, weight_decay=0.05)),
    Case("sgd-plain", uf.SGD, "sgd", dict(lr=1e-2, momentum=0.0, weight_decay=0.01)),
    Case("adan", uf.Adan, "adan", dict(lr=3e-2, betas=(0.8, 0.7, 0.95), eps=1e-3, weight_decay=0.1)),
    Case("adan-no-prox", uf.Adan, "adan", dict(lr=1e-2, betas=(0.9, 0.85, 0.9), eps=1e-4, weight_decay=0.2,
                                               no_prox=True)),
    # The global norm of harness gradients is 0.5-10: clipped at every step, by a factor that changes.
    Case("adan-clip", uf.Adan, "adan", dict(lr=3e-2, betas=(0.8, 0.7, 0.95), eps=1e-3, weight_decay=0.1,
                                            max_grad_norm=0.3)),
    Case("adagrad", uf.Adagrad, "adagrad", dict(lr=5e-2, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2,
                                               eps=1e-3)),
    # Per-tensor norms (a pre-pass), LARC's clipping (bites on the small gradients: ratios of 0.04 to 2 before it)
    # and the global clipping (eps: torch's clip_grad_norm_'s, which Case.grad_scale reads).
    Case("lars", uf.LARS, "lars", dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01, trust_coeff=0.02,
                                       trust_clip=True, eps=1e-6, max_grad_norm=2.0)),
    # The friction's exp of |g_prev - g| (its previous gradient is the decayed one), a large eps
    Case("diffgrad", uf.DiffGrad, "diffgrad", dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)),
    # Per-tensor norms of the update's direction (a pre-pass that computes it), timm's clipping (at 0.5, below the
    # harness's norms of 0.5-10), no grad averaging, and a large eps; the default bias correction.
    Case("lamb", uf.LAMB, "lamb", dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, grad_averaging=False,
                                       max_grad_norm=0.5)),
    # Per-row sums of the direction (a pre-pass that computes it) and the projection: delta 1.5 projects the random
    # gradients' tensors per row where every row's |cos| sqrt(row length) is below 1.5, else whole where the tensor's
    # is (both happen in a 15-step run), or not at all; a large eps, which the cosines' norms are clamped at.
    Case("adamp", uf.AdamP, "adamp", dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, delta=1.5,
                                          wd_ratio=0.3, nesterov=True)),
    Case("sgdp", uf.SGDP, "sgdp", dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1, delta=1.5,
                                       wd_ratio=0.3)),
    # Each tensor's g-SNR at its first step (a parameter without a gradient at step 0 takes it at its own first step),
    # from the clipped gradient (clipping at 2 bites on some steps; eps 1e-3, near the smaller gradients' std, lets
    # the factor change the g-SNR), a 1-element tensor's std taken as 0.
    Case("sgd_sai", uf.SGDSaI, "sgd_sai", dict(lr=1e-2, momentum=0.8, eps=1e-3, weight_decay=0.1, max_grad_norm=2.0)),
]
CASE_IDS = [c.id for c in CASES]

# Short budgets so a 15-step run covers warmup, decay and the tail past T.
SCHEDULES = {
    "none": None,
    "uba": uf.UBA(12, phi=0.5, warmup_steps=3, min_lr_ratio=0.1),
    "uba-phi3": uf.UBA(10, phi=3.0),
    "cosine": uf.Cosine(12, warmup_steps=2),
    "linear": uf.Linear(10, min_lr_ratio=0.2),
    "rex": uf.REX(11, warmup_steps=1, min_lr_ratio=0.05),
    "constant": uf.Constant(warmup_steps=4),
}

# Relative to the largest |value| of the tensor compared: fp32 carries the few ulps of a handful of
# operations; bf16 / fp16 storage rounds each stored value once (2^-8 / 2^-11) plus the fp32 work.
RTOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}
# fp16 has fixed spacing 2^-24 below 2^-14 (subnormals): tiny second moments round to that grid.
ATOL = {torch.float16: 2.0**-24}


def make_params(device="cpu", dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    """A mixed list: odd sizes, 0-size, 1-element, 4-D, a permuted view (dim 0 outermost: rows in one block each, as
    AdamP's kernels need), a storage-offset view."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    permuted = rnd(2, 5, 2).permute(0, 2, 1).detach()  # non-contiguous; 20 elements (random streams follow sizes)
    offset = rnd(34)[1:].detach()                      # storage offset 1: breaks 16-byte alignment
    ps = [rnd(7), rnd(0), rnd(1), rnd(3, 5, 2, 3), permuted, offset, rnd(129)]
    return [p.requires_grad_() for p in ps]


def random_grads(params, gen: torch.Generator, skip: int | None = None) -> list[torch.Tensor | None]:
    """Fresh random gradients at per-tensor scales from 1e-4 to 1; ``skip`` leaves one param without a grad."""
    out = []
    for i, p in enumerate(params):
        if i == skip:
            out.append(None)
            continue
        scale = 10 ** (-4 * torch.rand((), generator=gen).item())
        out.append((torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype))
    return out


def step_together(runs, gen: torch.Generator, steps: int) -> None:
    """Give every (params, optimizer) pair the same fresh gradients and step it, ``steps`` times."""
    for _ in range(steps):
        grads = random_grads(runs[0][0], gen)
        for params, opt in runs:
            set_grads(params, grads)
            opt.step()


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def step_scaled(opt, params, grads, scale: float | None) -> None:
    """One step on ``grads``, as torch.amp.GradScaler.step hands a step over when ``scale`` is given: the gradients
    multiplied by it, and ``opt.grad_scale`` set for the step."""
    set_grads(params, [None if g is None else g * scale if scale else g for g in grads])
    if scale:
        opt.grad_scale = torch.full((1,), scale, device=params[0].device)
    opt.step()
    if scale:
        del opt.grad_scale


def capture_step(opt):
    """A CUDA graph of one ``opt.step()``, captured on a side stream after the eager steps taken so far (PyTorch's
    recipe); the current stream waits for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    return graph


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()  # never a view of a float64 tensor


def assert_scaled_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, what: str,
                        ignore: np.ndarray | None = None, atol: float = 0.0, allowed: int = 0,
                        before: np.ndarray | None = None) -> None:
    """|actual - expected| <= rtol * max|expected| + atol elementwise (optionally ignoring a mask),
    except for at most ``allowed`` elements (Lion's sign of a near-zero value may round either way). ``before``: the
    value the step started from, whose magnitude counts too (a moving average b s + c g that cancels to near 0
    carries the rounding of its terms, which are as large as s)."""
    a = f64(actual)
    err = np.abs(a - expected)
    if ignore is not None:
        err = np.where(ignore, 0.0, err)
    largest = np.abs(expected).max(initial=0.0)
    if before is not None:
        largest = max(largest, np.abs(before).max(initial=0.0))
    bound = rtol * max(largest, 1e-30) + atol
    if err.size and (err > bound).sum() > allowed:
        i = np.unravel_index(err.argmax(), err.shape)
        raise AssertionError(f"{what}: max error {err.max():.3e} > {bound:.3e} at {i} "
                             f"(got {a[i]!r}, expected {expected[i]!r}; {(err > bound).sum()} of {err.size} off)")


def check_steps_against_oracle(case: Case, schedule, backend: str, dtype=torch.float32, device="cpu",
                               steps: int = 15, seed: int = 0, params=None, state_dtype=None) -> None:
    """Step the optimizer and, from a float64 copy of its inputs, the oracle; compare after every step, each
    tensor at the tolerance of the dtype it is stored in."""
    params = make_params(device, dtype, seed) if params is None else params
    opt = case.make(params, schedule=schedule, backend=backend, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    rtol, atol = RTOL[dtype], ATOL.get(dtype, 0.0)
    for t in range(steps):
        grads = random_grads(params, gen, skip=t % 4 if t % 3 == 0 else None)
        set_grads(params, grads)
        before = [(f64(p), {k: f64(v) for k, v in opt.state.get(p, {}).items() if k != "step"},
                   int(opt.state[p]["step"]) if p in opt.state else 0) for p in params]
        opt.step()
        group = opt.param_groups[0]
        sched_args = {} if schedule is None else schedule.to_dict()
        name = sched_args.pop("name", None)
        factor = 1.0 if schedule is None else oracle.schedule_factor(
            name, t, sched_args.get("total_steps"), sched_args.get("warmup_steps", 0),
            sched_args.get("min_lr_ratio", 0.0), sched_args.get("phi", 1.0))
        lr = float(group["lr"]) * factor
        np.testing.assert_allclose(float(opt.get_last_lr()[0]), lr, rtol=1e-6, err_msg=f"applied lr at step {t}")
        assert int(group["schedule_step"]) == t + 1
        scale = case.grad_scale(grads)
        for i, (p, g, (p0, s0, k0)) in enumerate(zip(params, grads, before)):
            where = f"{case.id}/{backend}/{dtype} step {t} param {i}"
            if g is None:
                np.testing.assert_array_equal(f64(p), p0, err_msg=f"{where}: a param without grad moved")
                continue
            names = opt._state_names(group)
            s0 = {**{n: s0[n] for n in opt._scalars if n in s0},  # (SGD-SaI's g-SNR, once measured)
                  **{n: s0.get(n, np.full_like(p0, oracle.initial(case.rule, n, case.hyper(group)))) for n in names}}
            exp_p, exp_s = oracle.RULES[case.rule](p0, f64(g) * scale, s0, k0 + 1, lr=lr, **case.hyper(group))
            ignore = oracle.lion_ambiguous(f64(g), s0, **case.hyper(group)) if case.rule == "lion" else None
            assert int(opt.state[p]["step"]) == k0 + 1, f"{where}: step count"
            assert_scaled_close(p, exp_p, rtol, f"{where}: param", ignore, atol)
            for n in names:
                s = opt.state[p][n]
                assert s.dtype == (state_dtype or dtype), f"{where}: state {n} is {s.dtype}"
                assert_scaled_close(s, exp_s[n], RTOL[s.dtype], f"{where}: state {n}", atol=ATOL.get(s.dtype, 0.0),
                                    before=s0[n])
            for n in opt._scalars:  # kept in float32 (float64 for a float64 parameter)
                assert_scaled_close(opt.state[p][n], np.asarray(exp_s[n]), RTOL[opt.state[p][n].dtype], f"{where}: {n}")


def assert_same_runs(a, b, opt_a, opt_b, where=""):
    """Two optimizers over twin parameter lists agree: parameters, state, step counts, counters, lr (b against a)."""
    # State exists for the same parameters: those that have had a gradient, as torch.optim does it.
    assert [bool(opt_a.state.get(p)) for p in a] == [bool(opt_b.state.get(q)) for q in b], f"{where}which have state"
    for i, (p, q) in enumerate(zip(a, b)):
        # Lion moves each element by +-lr: a near-zero update direction may round to either sign on
        # two backends. Such flips are counted (about 1e-6 of the elements), not hidden by a tolerance.
        allowed = int(1e-5 * p.numel()) + 1 if opt_a.rule == "lion" else 0
        assert_scaled_close(q, f64(p), RTOL[p.dtype], f"{where}param {i}", allowed=allowed)
        for k, v in opt_a.state.get(p, {}).items():
            if k == "step":
                assert int(v) == int(opt_b.state[q][k]), f"{where}param {i} step"
            else:
                assert_scaled_close(opt_b.state[q][k], f64(v), RTOL[v.dtype], f"{where}param {i} state {k}")
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert int(ga["schedule_step"]) == int(gb["schedule_step"])
    for la, lb in zip(opt_a.get_last_lr(), opt_b.get_last_lr()):
        assert float(lb) == pytest.approx(float(la), rel=1e-6)


def snapshot(opt, params):
    return copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))


@contextlib.contextmanager
def one_rank_mesh(device: str = "cpu"):
    """A device mesh of one rank on ``device`` (gloo for CPU, nccl for CUDA), for DTensor parameters in this process
    (a process group of its own unless one is up already, destroyed after)."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh(device, (1,))
    finally:
        if ours:
            dist.destroy_process_group()
