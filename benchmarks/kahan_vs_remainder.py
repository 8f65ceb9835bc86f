"""Which way of keeping bfloat16 parameters follows a float32 run: the evidence behind not building Kahan summation.

A long run of small updates, as late in a decaying schedule: x <- x - lr(t) u(t), u drawn with a drift (the signal)
and noise, lr(t) decaying by a cosine from 1e-3 to 0 over T steps, on N parameters of magnitude about 0.02 (the
updates are then 1/10 to 1/1000 of a bfloat16 spacing). Each layout keeps x its own way and is compared with the
float32 run at the end:
  nearest     bfloat16, rounded to nearest at every step (2 bytes per parameter)
  stochastic  bfloat16, rounded stochastically (2 bytes)
  kahan       bfloat16 plus a bfloat16 compensation buffer, as optimi keeps it (4 bytes)
  remainder   bfloat16 plus the 16 low bits of the float32 master (4 bytes: uba_fused's master_weights="exact")
  correction  bfloat16 plus the next 8 bits, a 24-bit master rounded to stochastically (3 bytes: master_weights="8bit")

    python benchmarks/kahan_vs_remainder.py [--steps T] [--n N]

Prints, per layout, the RMS and the mean of (its x - float32's x) over the RMS distance the float32 run travelled.
"""

import argparse
import math

import torch

from uba_fused.backends import rounding


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--n", type=int, default=200_000)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    x0 = bf16(torch.randn(a.n, generator=gen) * 0.02)
    drift = torch.randn(a.n, generator=gen) * 0.5
    ref = x0.clone()
    near, sto = x0.clone(), x0.clone()
    kahan, comp = x0.clone(), torch.zeros(a.n)
    hi, low = rounding.master_split(x0)
    hi8, low8 = hi.clone(), torch.zeros(a.n, dtype=torch.int8)
    for t in range(a.steps):
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * t / a.steps))
        u = -lr * (drift + torch.randn(a.n, generator=gen))
        ref = ref + u
        near = bf16(near + u)
        sto = rounding.round_stochastic(sto + u, rounding.random_bits(sto, 1, 0, torch.tensor(t))).float()
        cu = bf16(comp + u)  # optimi's Kahan step, every buffer stored in bfloat16
        new = bf16(kahan + cu)
        comp, kahan = bf16(cu + (kahan - new)), new
        hi, low = rounding.master_split(rounding.master_join(hi, low) + u)
        y = rounding.master8_join(hi8, low8) + u
        hi8, low8 = rounding.master8_split(y, rounding.random_bits(y, 2, 0, torch.tensor(t)))
    travel = (ref - x0).pow(2).mean().sqrt()
    exact = rounding.master_join(hi, low)
    print(f"{a.n} parameters, {a.steps} steps; float32 travelled {travel:.3e} RMS")
    for name, x in (("nearest", near), ("stochastic", sto), ("kahan", kahan), ("remainder (master)", exact),
                    ("remainder, as the bf16 parameter", hi.float()),
                    ("correction (24-bit master)", rounding.master8_join(hi8, low8)),
                    ("correction, as the bf16 parameter", hi8.float())):
        err = x - ref
        print(f"  {name:34s} RMS error {err.pow(2).mean().sqrt() / travel:.2e}, mean error {err.mean() / travel:+.2e}"
              f" (of the distance travelled){'  bit for bit' if torch.equal(x, ref) else ''}")


if __name__ == "__main__":
    main()
