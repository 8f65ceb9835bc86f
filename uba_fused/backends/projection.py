"""AdamP's and SGDP's projection (Heo et al., ICLR 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers
on Scale-invariant Weights"; the adamp package 0.3.0), for a parameter of 2 dims or more, from sums over its rows.

Where the gradient is nearly orthogonal to the weight (|cos| below delta / sqrt(n) for vectors of n elements, cos as
F.cosine_similarity takes it with eps) in every row (dim 0: an output channel), each row's direction d loses its radial
part; else, where it is in the tensor as a whole, the tensor's does; either way the decoupled decay is scaled by
wd_ratio. With p_n = p / (||p|| + eps), the radial part p_n (p_n . d) is p (p . d) / (||p|| + eps)^2: a coefficient per
row times p. Everything comes from sums over rows (registry.PROJECTION), so the kernels take them in a pre-pass, and
every rank of a tensor sharded by rows adds its rows' into the tensor's (tensor_sums: every column a sum). The one
definition, for every backend: backend "torch" calls it per tensor, the kernel backends once per plan part
(plan.Plan.reduce and project).
"""

from __future__ import annotations

import torch


def row_sums(p: torch.Tensor, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """float64 [rows, 4]: per row of p (its index along dim 0; one row for p of fewer than 2 dims) the sums of p^2,
    g^2, p g and p d (registry.PROJECTION)."""
    rows = p.shape[0] if p.dim() > 1 else 1
    x, y, z = (t.double().reshape(rows, p.numel() // rows if rows else 0) for t in (p, g, d))
    return torch.stack([(x * x).sum(1), (y * y).sum(1), (x * y).sum(1), (x * z).sum(1)], 1)


def _cosine(pp: torch.Tensor, gg: torch.Tensor, pg: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """|cos| of two vectors from their sums, as F.cosine_similarity takes it:
    p g / (max(||p||, eps) max(||g||, eps))."""
    return pg.abs() / (torch.maximum(pp.sqrt(), eps) * torch.maximum(gg.sqrt(), eps))


def tensor_sums(rows: torch.Tensor, lengths: torch.Tensor, row_len: torch.Tensor, delta: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
    """What the projection's pre-pass answers for n tensors from their rows (``rows`` [R, 4], ``lengths`` [n]: each
    tensor's count of them, one after another): float64 [n, 6], per tensor its rows' sums, the count of its rows whose
    gradient is not nearly orthogonal to the weight (|cos| >= delta / sqrt(row_len)), and its numel. Each column is a
    sum over rows, so a tensor sharded by rows (FSDP2's dim 0) completes it by one all-reduce. ``row_len``, ``delta``,
    ``eps``: float64 [n]."""
    n, size = lengths.shape[0], rows.shape[0]

    def rep(t: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(t, lengths, output_size=size)

    cos = _cosine(*rows[:, :3].unbind(1), rep(eps))
    aligned = (cos >= rep(delta / row_len.sqrt())).double()
    per = torch.segment_reduce(torch.cat([rows, aligned[:, None]], 1), "sum", lengths=lengths, axis=0, unsafe=True)
    return torch.cat([per.reshape(n, 5), (lengths.double() * row_len)[:, None]], 1)


def projection(sums: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, delta: torch.Tensor, eps: torch.Tensor,
               wd_ratio: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each tensor's sums over all its shards (``sums``, tensor_sums's [n, 6]) and its rows here (``rows``,
    ``lengths``): (each row's coefficient a, float64 [R], which the update rounds to its compute dtype: its direction
    becomes d - a p; each tensor's factor of the decoupled decay, float64 [n]). ``projected``: bool [n], whether a
    tensor may be projected (2 dims or more); ``delta``, ``eps``, ``wd_ratio``: float64 [n]. Nothing here syncs."""
    pp, gg, pg, pd, aligned, numel = sums.unbind(1)
    channel = projected & (aligned == 0)
    layer = projected & ~channel & (_cosine(pp, gg, pg, eps) < delta / numel.sqrt())
    size = rows.shape[0]

    def rep(t: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(t, lengths, output_size=size)

    row_norm = rows[:, 0].sqrt() + rep(eps)
    norm = pp.sqrt() + eps
    whole = rep(pd / (norm * norm))
    coef = torch.where(rep(channel), rows[:, 3] / (row_norm * row_norm), torch.where(rep(layer), whole, 0.0))
    return coef, torch.where(channel | layer, wd_ratio, 1.0)
