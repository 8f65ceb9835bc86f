"""Which 8-bit map keeps AdamW's moments best: the measurement behind registry.QBLOCK and backends/rounding.py's maps.

Trains the charlm task of ``python -m uba_fused.bench.train`` (width 64) with torch.optim.AdamW in float32, and at a
few steps takes every moment (m, v) of the tensors of at least 4096 elements. Each candidate map quantizes them per
block of B elements (one float32 absmax per block, codes rounded to nearest) and decodes them; the error is measured
where it acts, on the update direction u = m / (sqrt(v) + eps) that AdamW applies (bias corrections left out: they
scale m and v alike within a tensor):
  rel_rms   ||u_q - u|| / ||u||, over all the tensors
  p999      the 99.9th percentile of |u_q - u| / rms(u): the few elements a map throws furthest
  blowups   the fraction of elements with |u_q| > 4 |u| + rms(u): where a v quantized to (almost) 0 makes u explode

Maps (y = x / absmax of its block; signed for m, non-negative for v; q the code):
  linear    q = 127 y (m), 255 y (v)
  sqrt      q = 127 sign(y) |y|^1/2 (m); 255 y^1/2 (v: FlashOptim's companding of v)
  root4     255 y^1/4 (v only): 4 times the dynamic range of sqrt in bits, exact to decode (two squarings)
  rational  q = 127 * 2y / (1 + |y|) (m only: FlashOptim's companding of m)
  log       256 codes log-spaced over 1e-7..1 with sign (m) or without (v): a stand-in for bitsandbytes' dynamic map
            (constant relative precision); it needs log and exp, which round differently on each backend, so it is a
            reference point here, not a candidate for the kernels.

    python benchmarks/state_maps.py [--steps 25 100 400] [--json PATH]
"""

import argparse
import json
import math

import torch

from uba_fused.bench import train


def blocks(x: torch.Tensor, b: int) -> tuple[torch.Tensor, int]:
    n = x.numel()
    pad = -n % b
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).reshape(-1, b), n


def quantize(x: torch.Tensor, signed: bool, kind: str, b: int) -> torch.Tensor:
    """x quantized by map ``kind`` per block of b elements and decoded (float64 math: the map's error, not
    float32's)."""
    xb, n = blocks(x.double(), b)
    levels = 127 if signed else 255
    if kind == "log":
        grid = torch.logspace(-7, 0, levels, dtype=torch.float64)
        a = xb.abs().amax(1, keepdim=True).clamp_min(1e-300)
        y = (xb.abs() / a).clamp(1e-300, 1)
        idx = torch.bucketize(y.log(), grid.log())  # the two neighbours: the nearer in log
        lo, hi = grid[(idx - 1).clamp(0, levels - 1)], grid[idx.clamp(max=levels - 1)]
        near = torch.where((y.log() - lo.log()).abs() <= (hi.log() - y.log()).abs(), lo, hi)
        near = torch.where(y < grid[0] / 2, torch.zeros_like(y), near)
        return (near * a * xb.sign()).reshape(-1)[:n].reshape(x.shape)
    power = {"linear": 1.0, "sqrt": 0.5, "root4": 0.25, "rational": None}[kind]
    a = xb.abs().amax(1, keepdim=True)
    y = torch.where(a > 0, xb / a, torch.zeros_like(xb))
    if power is None:
        z = 2 * y / (1 + y.abs())
        zq = torch.round(z * levels) / levels
        out = zq / (2 - zq.abs())
    else:
        zq = torch.round(y.abs() ** power * levels) / levels
        out = zq ** (1 / power) * y.sign()
    return (out * a).reshape(-1)[:n].reshape(x.shape)


def direction(m: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return m.double() / (v.double().sqrt() + eps)


def snapshots(steps: list[int], seed: int) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    a = train.parse_args(["--scale", "2"])
    task = train.TASKS["charlm"]
    data = task.data(a, torch.device("cpu"))
    torch.manual_seed(seed)
    model = task.model(a)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr / 2, weight_decay=task.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(1, max(steps) + 1):
        loss = task.loss(model, data, a.batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t in steps:
            out[t] = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for p, s in opt.state.items()
                      if p.numel() >= 4096]
    return out


def measure(moments: list[tuple[torch.Tensor, torch.Tensor]], m_map: str, v_map: str, b: int) -> dict:
    num = den = 0.0
    errs, blow, count = [], 0, 0
    for m, v in moments:
        u = direction(m, v)
        uq = direction(quantize(m, True, m_map, b), quantize(v, False, v_map, b))
        rms = u.pow(2).mean().sqrt()
        num += float((uq - u).pow(2).sum())
        den += float(u.pow(2).sum())
        errs.append(((uq - u).abs() / rms).reshape(-1))
        blow += int((uq.abs() > 4 * u.abs() + rms).sum())
        count += u.numel()
    e = torch.cat(errs)
    return {"rel_rms": math.sqrt(num / den), "p999": float(torch.quantile(e[:2**24], 0.999)),
            "blowups": blow / count}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256, 2048])
    ap.add_argument("--json")
    a = ap.parse_args()
    snaps = snapshots(a.steps, 0)
    pairs = [("linear", "linear"), ("sqrt", "sqrt"), ("rational", "sqrt"), ("linear", "root4"), ("sqrt", "root4"),
             ("rational", "root4"), ("log", "log")]
    rows = []
    print(f"{'m map':>9} {'v map':>7} {'block':>5} " + " ".join(f"{'step ' + str(t):>30}" for t in a.steps))
    for b in a.blocks:
        for m_map, v_map in pairs:
            cells = {t: measure(snaps[t], m_map, v_map, b) for t in a.steps}
            rows.append({"m": m_map, "v": v_map, "block": b, **{str(t): c for t, c in cells.items()}})
            print(f"{m_map:>9} {v_map:>7} {b:>5} " + " ".join(
                f"{c['rel_rms']:9.4f} {c['p999']:9.3f} {c['blowups']:10.2e}" for c in cells.values()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"columns": "rel_rms p999 blowups per step", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
