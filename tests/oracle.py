"""Independent float64 re-derivations of the published formulas, in NumPy.

Written from the papers and the issue text, not from uba_fused's code, so that a
mistake copied into every backend still fails here.
"""

from __future__ import annotations

import math

import numpy as np


def schedule_factor(name: str, t: int, total: int | None = None, warmup: int = 0, r: float = 0.0,
                    phi: float = 1.0) -> float:
    if t < warmup:
        return (t + 1) / warmup
    if name == "Constant":
        return 1.0
    p = min(max((t - warmup) / (total - warmup), 0.0), 1.0)
    cos = math.cos(math.pi * p)
    if name == "UBA":  # Tang et al. 2025, eq. of the unified budget-aware schedule
        shape = 2 * (1 + cos) / (2 * phi + (2 - phi) * (1 + cos))
    elif name == "Cosine":
        shape = (1 + cos) / 2
    elif name == "Linear":
        shape = 1 - p
    elif name == "REX":
        shape = (1 - p) / (1 - p / 2)
    else:
        raise ValueError(name)
    return r + (1 - r) * shape


def adamw(p, g, state, k, lr, betas, eps, weight_decay, **_):
    """Loshchilov & Hutter's AdamW as torch.optim.AdamW computes it; k is the 1-based step."""
    b1, b2 = betas
    m = b1 * state["exp_avg"] + (1 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    m_hat = m / (1 - b1**k)
    denom = np.sqrt(v) / math.sqrt(1 - b2**k) + eps
    p = p * (1 - lr * weight_decay) - lr * m_hat / denom
    return p, {"exp_avg": m, "exp_avg_sq": v}


def adabelief(p, g, state, k, lr, betas, eps, weight_decay, **_):
    """AdaBelief as adabelief-pytorch 0.2 computes it (decoupled decay, eps inside s, no rectify)."""
    b1, b2 = betas
    m = b1 * state["exp_avg"] + (1 - b1) * g
    s = b2 * state["exp_avg_var"] + (1 - b2) * (g - m) ** 2 + eps
    p = p * (1 - lr * weight_decay) - lr / (1 - b1**k) * m / (np.sqrt(s) / math.sqrt(1 - b2**k) + eps)
    return p, {"exp_avg": m, "exp_avg_var": s}


def lion(p, g, state, k, lr, betas, weight_decay, **_):
    """Lion (Chen et al. 2023, Algorithm 2)."""
    b1, b2 = betas
    m = state["exp_avg"]
    c = b1 * m + (1 - b1) * g
    p = p * (1 - lr * weight_decay) - lr * np.sign(c)
    return p, {"exp_avg": b2 * m + (1 - b2) * g}


def lion_ambiguous(g, state, betas, **_) -> np.ndarray:
    """Elements whose sign(c) float32 rounding may legitimately flip: |c| within rounding of its terms."""
    b1, _ = betas
    m = state["exp_avg"]
    c = b1 * m + (1 - b1) * g
    return np.abs(c) <= 1e-5 * (np.abs(b1 * m) + np.abs((1 - b1) * g))


def sgd(p, g, state, k, lr, momentum, dampening, nesterov, weight_decay, **_):
    """torch.optim.SGD: L2 decay, the first buffer is the gradient itself."""
    d = g + weight_decay * p
    if momentum == 0:
        return p - lr * d, {}
    buf = d if k == 1 else momentum * state["momentum_buffer"] + (1 - dampening) * d
    step = d + momentum * buf if nesterov else buf
    return p - lr * step, {"momentum_buffer": buf}


def adan(p, g, state, k, lr, betas, eps, weight_decay, no_prox, **_):
    """Adan (Xie et al. 2022, Algorithm 1 with the restart-free PyTorch reference of sail-sg/Adan): the moments
    of the gradient, of its change d = g_k - g_{k-1} (0 at k = 1) and of g + b2 d, each bias-corrected."""
    b1, b2, b3 = betas
    d = np.zeros_like(g) if k == 1 else g - (-state["neg_pre_grad"])
    m = b1 * state["exp_avg"] + (1 - b1) * g
    a = b2 * state["exp_avg_diff"] + (1 - b2) * d
    n = b3 * state["exp_avg_sq"] + (1 - b3) * (g + b2 * d) ** 2
    eta = lr / (np.sqrt(n) / math.sqrt(1 - b3**k) + eps)
    u = eta * (m / (1 - b1**k) + b2 * a / (1 - b2**k))
    p = p * (1 - lr * weight_decay) - u if no_prox else (p - u) / (1 + lr * weight_decay)
    return p, {"exp_avg": m, "exp_avg_sq": n, "exp_avg_diff": a, "neg_pre_grad": -g}


def adagrad(p, g, state, k, lr, lr_decay, eps, weight_decay, **_):
    """Adagrad (Duchi, Hazan and Singer 2011) as torch.optim.Adagrad computes it: L2 decay, the lr divided by
    1 + (k - 1) lr_decay, the sum of squares starting at initial_accumulator_value (``initial``)."""
    d = g + weight_decay * p
    s = state["sum"] + d * d
    return p - lr / (1 + (k - 1) * lr_decay) * d / (np.sqrt(s) + eps), {"sum": s}


def lars(p, g, state, k, lr, momentum, dampening, nesterov, weight_decay, trust_coeff, eps, trust_clip, always_adapt,
         **_):
    """LARS (You, Gitman and Ginsburg 2017) with LARC's clipping, as timm's Lars computes it: where the group decays
    or always adapts, (g + wd p) is scaled by trust_coeff ||p|| / (||g|| + wd ||p|| + eps) (1 where a norm is 0),
    clipped to min(ratio / lr, 1) with trust_clip; then SGD with momentum."""
    if weight_decay != 0 or always_adapt:
        w, gn = np.linalg.norm(p), np.linalg.norm(g)
        ratio = trust_coeff * w / (gn + w * weight_decay + eps) if w > 0 and gn > 0 else 1.0
        if trust_clip:  # at lr 0 (a schedule's end) ratio / lr is inf: clipped to 1
            ratio = min(ratio / lr, 1.0) if lr > 0 else 1.0
        g = (g + weight_decay * p) * ratio
    if momentum == 0:
        return p - lr * g, {}
    buf = g if k == 1 else momentum * state["momentum_buffer"] + (1 - dampening) * g
    return p - lr * (g + momentum * buf if nesterov else buf), {"momentum_buffer": buf}


def lamb(p, g, state, k, lr, bias_correction, betas, eps, weight_decay, grad_averaging, trust_clip, always_adapt, **_):
    """LAMB (You et al. 2020, Algorithm 2 with phi the identity) as timm's Lamb computes it: Adam's bias-corrected
    direction (m takes (1 - b1) g, or g without grad averaging) plus L2 decay, r; where the group decays or always
    adapts, scaled by ||p|| / ||r|| (1 where a norm is 0), clipped at 1 with trust_clip."""
    b1, b2 = betas
    m = b1 * state["exp_avg"] + ((1 - b1) if grad_averaging else 1.0) * g
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    bc1, bc2 = (1 - b1**k, 1 - b2**k) if bias_correction else (1.0, 1.0)
    r = m / bc1 / (np.sqrt(v) / math.sqrt(bc2) + eps) + weight_decay * p
    ratio = 1.0
    if weight_decay != 0 or always_adapt:
        w, rn = np.linalg.norm(p), np.linalg.norm(r)
        ratio = w / rn if w > 0 and rn > 0 else 1.0
        if trust_clip:
            ratio = min(ratio, 1.0)
    return p - lr * ratio * r, {"exp_avg": m, "exp_avg_sq": v}


def diffgrad(p, g, state, k, lr, betas, eps, weight_decay, **_):
    """diffGrad (Dubey et al. 2019, Algorithm 1) as torch-optimizer's DiffGrad computes it: L2 decay into the
    gradient, Adam's moments, the first scaled per element by the sigmoid of |g_prev - g| (g_prev 0 at first), and
    lr sqrt(1 - b2^k) / (1 - b1^k) m xi / (sqrt(v) + eps)."""
    b1, b2 = betas
    d = g + weight_decay * p
    m = b1 * state["exp_avg"] + (1 - b1) * d
    v = b2 * state["exp_avg_sq"] + (1 - b2) * d * d
    xi = 1 / (1 + np.exp(-np.abs(state["previous_grad"] - d)))
    p = p - lr * math.sqrt(1 - b2**k) / (1 - b1**k) * m * xi / (np.sqrt(v) + eps)
    return p, {"exp_avg": m, "exp_avg_sq": v, "previous_grad": d}


def _cosine(x, y, eps):
    """|cos| of each row of x with y's, as F.cosine_similarity(eps=eps) takes it: each norm clamped at eps."""
    norms = np.maximum(np.linalg.norm(x, axis=1), eps) * np.maximum(np.linalg.norm(y, axis=1), eps)
    return np.abs((x * y).sum(1)) / norms


def _project(p, g, d, delta, wd_ratio, eps):
    """AdamP's projection (Heo et al. 2021, Algorithms 1 and 2, as the adamp package's _projection computes it): for a
    parameter of 2 dims or more, first per output channel, then over the whole tensor, where the gradient is nearly
    orthogonal to the weight (every |cos| < delta / sqrt(the vector's length)), d loses its part along the unit
    weight vectors p_n = p / (||p|| + eps); the decay's factor is then wd_ratio."""
    if p.ndim < 2 or p.size == 0:  # (the package's views fail on a 0-size tensor: it has nothing to project)
        return d, 1.0
    for rows in (p.shape[0], 1):
        x, y, z = (t.reshape(rows, -1) for t in (p, g, d))
        if _cosine(y, x, eps).max() < delta / math.sqrt(x.shape[1]):
            unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
            return (z - unit * (unit * z).sum(1, keepdims=True)).reshape(p.shape), wd_ratio
    return d, 1.0


def adamp(p, g, state, k, lr, betas, eps, weight_decay, delta, wd_ratio, nesterov, **_):
    """AdamP (Algorithm 2) as the adamp package's AdamP: Adam's direction m / (sqrt(v / (1 - b2^k)) + eps) (with
    nesterov, (b1 m + (1 - b1) g) for m), projected; decoupled decay times its factor; the step lr / (1 - b1^k)."""
    b1, b2 = betas
    m = b1 * state["exp_avg"] + (1 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2**k) + eps
    d, ratio = _project(p, g, (b1 * m + (1 - b1) * g if nesterov else m) / denom, delta, wd_ratio, eps)
    return p * (1 - lr * weight_decay * ratio) - lr / (1 - b1**k) * d, {"exp_avg": m, "exp_avg_sq": v}


def sgdp(p, g, state, k, lr, momentum, dampening, nesterov, weight_decay, eps, delta, wd_ratio, **_):
    """SGDP (Algorithm 1) as the adamp package's SGDP: a buffer from 0, b = momentum b + (1 - dampening) g, the
    direction b (g + momentum b with nesterov) projected, and without nesterov kept as the buffer (the package
    projects the buffer in place); decoupled decay times its factor / (1 - momentum)."""
    b = momentum * state["momentum_buffer"] + (1 - dampening) * g
    d, ratio = _project(p, g, g + momentum * b if nesterov else b, delta, wd_ratio, eps)
    p = p * (1 - lr * weight_decay * ratio / (1 - momentum)) - lr * d
    return p, {"momentum_buffer": b if nesterov else d}


def sgd_sai(p, g, state, k, lr, momentum, eps, weight_decay, **_):
    """SGD-SaI (Xu et al. 2024, Algorithm 1, as the sgd-sai package's SGD_sai computes it): at a tensor's first step its
    g-SNR ||g|| / (std(g) + eps), std with Bessel's correction and 0 where it is NaN (one element), kept after; the
    buffer the first gradient, then momentum b + (1 - momentum) g (the gradient itself with momentum 0); decoupled
    decay at lr, the step lr g-SNR."""
    if k == 1:
        std = float(np.std(g, ddof=1)) if g.size > 1 else 0.0
        gsnr = float(np.linalg.norm(g)) / (std + eps)
    else:
        gsnr = float(state["gsnr"])
    new = {"gsnr": np.float64(gsnr)}
    b = g
    if momentum != 0:
        b = new["momentum_buffer"] = g if k == 1 else momentum * state["momentum_buffer"] + (1 - momentum) * g
    return p * (1 - lr * weight_decay) - lr * gsnr * b, new


def initial(rule: str, name: str, hyper: dict) -> float:
    """State slot ``name``'s value before a parameter's first step."""
    return float(hyper["initial_accumulator_value"]) if rule == "adagrad" else 0.0


RULES = {"adamw": adamw, "adabelief": adabelief, "lion": lion, "sgd": sgd, "adan": adan, "adagrad": adagrad,
         "lars": lars, "lamb": lamb, "diffgrad": diffgrad, "adamp": adamp, "sgdp": sgdp,
         "sgd_sai": sgd_sai}
