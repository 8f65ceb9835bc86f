"""Draw docs/schedules.png: the lr factor of every schedule over a 1000-step budget with 50 warmup steps."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import uba_fused as uf  # noqa: E402

T, W = 1000, 50
curves = {f"UBA phi={phi}": uf.UBA(T, phi=phi, warmup_steps=W) for phi in (0.25, 0.5, 1.0, 2.0, 5.0)}
curves |= {"Cosine": uf.Cosine(T, W), "Linear": uf.Linear(T, W), "REX": uf.REX(T, W), "Constant": uf.Constant(W)}
t = torch.arange(T + 50)
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, s in curves.items():
    style = "-" if name.startswith("UBA") else "--"
    ax.plot(t, s.factor_tensor(t), style, label=name, lw=1.6)
ax.set_xlabel("step t")
ax.set_ylabel("lr factor")
ax.set_title(f"Schedules over a budget of T={T} steps, {W} warmup (UBA phi=2 overlays Cosine)")
ax.legend(ncol=2, fontsize=9)
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(os.path.join(os.path.dirname(__file__), "schedules.png"), dpi=110)
