"""An adaptive batch size from gradient accumulation: AdAdaGrad's norm test.

Lau, Liu and Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods" (arXiv 2402.11215),
grow the batch of an adaptive method whenever the norm test of Byrd et al. (2012) says the step's gradient is too
noisy: with ``g_bar`` the batch's gradient and ``Var`` the variance of one sample's gradient, summed over the
coordinates, the test holds when ``Var / b <= eta^2 ||g_bar||^2``, and otherwise the next batch takes
``b = ceil(Var / (eta^2 ||g_bar||^2))`` samples (never fewer than now). The authors' code computes ``Var`` from
per-sample gradients (``torch.func.vmap``), and, under gradient accumulation, combines the micro-batches' per-sample
variances.

``NormTest`` reads the variance across micro-batches instead, which gradient accumulation has without per-sample
gradients: K micro-batch gradients ``g_k`` (each the mean over its m samples), their mean ``g_bar``, and
``s2 = sum_j sum_k (g_kj - g_bar_j)^2 / (K - 1)``, the unbiased variance of one micro-batch's gradient summed over the
coordinates. A micro-batch's gradient has the variance of one sample's over m, so the test on the b = K m samples,
``Var / b <= eta^2 ||g_bar||^2``, is ``s2 / K <= eta^2 ||g_bar||^2``, and the next step takes
``K' = max(K, ceil(s2 / (eta^2 ||g_bar||^2)))`` micro-batches (capped at ``max_micro_batches``). With micro-batches of
one sample this is the authors' statistic exactly.

The paper's coordinate-wise form of the test (for AdaGrad) is not built here: its text could not be read.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from .backends import shards
from .backends.work import is_dtensor, local, placed_like

__all__ = ["NormTest"]


class NormTest:
    """Accumulates each micro-batch's gradient and its square, then says how many micro-batches the next step
    should take (AdAdaGrad's norm test; module docstring)::

        test = uf.NormTest(model.parameters(), eta=0.5)
        k = 2
        for step in range(steps):
            for x, y in loader.take(k):            # k micro-batches of the same size
                loss_fn(model(x), y).backward()      # p.grad: this micro-batch's gradient
                test.accumulate()                    # into the sums; p.grad set to None
            k = test.finish()                        # p.grad: the mean over the k; k: the next step's count
            opt.step()
            opt.zero_grad(set_to_none=True)

    ``accumulate()`` adds every parameter's gradient and its square into float32 buffers (two foreach ops on the
    device, no sync) and drops the gradient, so the next backward writes the next micro-batch's alone. ``finish()``
    writes the mean into ``p.grad`` (in the parameter's dtype), computes the test on the device (a few foreach ops,
    summed in float64), and reads its answer on the host: one sync per optimizer step, which the answer needs to
    reach the data loader. A parameter that got no
    gradient in some micro-batch counts it as zero; one that got none in any keeps ``p.grad`` None.

    ``eta`` > 0: the test's tolerance (smaller: larger batches). ``max_micro_batches``: a cap on the answer. The last
    step's statistics stay readable: ``variance`` (s2, float64 on the device), ``grad_norm_sq`` (``||g_bar||^2``) and
    ``micro_batches`` (K).

    Under DDP and FSDP2 every micro-batch's backward must be synchronised (no ``no_sync()``, no
    ``set_requires_gradient_sync(False)``): each micro-batch's gradient is then the global one, and ``finish()``
    writes the gradient the step applies. With DTensor parameters (FSDP2, HSDP, tensor parallelism; every parameter a
    DTensor) each rank sums its shards and the sums are all-reduced over the ranks that shard each tensor, as
    clipping's norm is (backends/shards.py): every rank gets the same answer, and must call ``finish()``. (DDP,
    FSDP2 and tensor parallelism: tested on 2 gloo ranks, and FSDP2 beside tensor parallelism on 4.)
    Memory: two float32 buffers the size of the parameters. (The squares are summed in float32: the variance is
    exact to about 1e-7 of their sum, where the test compares it with ``eta^2 K`` times the mean's square.)"""

    def __init__(self, params: Iterable[torch.Tensor], *, eta: float, max_micro_batches: int | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty: the norm test needs the parameters whose gradients it accumulates")
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not eta > 0 or not math.isfinite(eta):
            raise ValueError(f"eta must be a finite real number > 0, got {eta!r}")
        if max_micro_batches is not None and (isinstance(max_micro_batches, bool) or
                                              not isinstance(max_micro_batches, numbers.Integral) or
                                              max_micro_batches < 2):
            raise ValueError(f"max_micro_batches must be None or an integer >= 2, got {max_micro_batches!r}")
        layout = shards.layout_of([{"params": self.params}])
        if isinstance(layout, str):
            raise TypeError(f"the norm test sums each DTensor's shards over the ranks, which needs every parameter to "
                            f"be a DTensor: {layout}")
        self._layout = layout
        self.eta, self.max_micro_batches = float(eta), max_micro_batches
        self._sums: list[torch.Tensor | None] = [None] * len(self.params)
        self._squares: list[torch.Tensor | None] = [None] * len(self.params)
        self._count = 0
        self.variance: torch.Tensor | None = None
        self.grad_norm_sq: torch.Tensor | None = None
        self.micro_batches = 0

    def accumulate(self) -> None:
        """Add every parameter's gradient (one micro-batch's) and its square into the sums; set ``p.grad`` None."""
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i in have:
            p, g = self.params[i], self.params[i].grad
            if g.layout != torch.strided:
                raise ValueError(f"params[{i}]'s gradient must be dense, got layout {g.layout}")
            if is_dtensor(p) and (not is_dtensor(g) or g.placements != p.placements):
                raise ValueError(f"params[{i}] is a DTensor placed {p.placements}; its gradient must be placed alike, "
                                 f"got {getattr(g, 'placements', 'a plain tensor')}")
        for i in have:
            if self._sums[i] is None:
                p = local(self.params[i])
                self._sums[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                self._squares[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if have:
            grads = [local(self.params[i].grad).float() for i in have]
            torch._foreach_add_([self._sums[i] for i in have], grads)
            torch._foreach_addcmul_([self._squares[i] for i in have], grads, grads)
        for i in have:
            self.params[i].grad = None
        self._count += 1

    def finish(self) -> int:
        """Write the mean gradient into each ``p.grad``, and return how many micro-batches the next step should take:
        ``max(K, ceil(s2 / (eta^2 ||g_bar||^2)))``, at most ``max_micro_batches`` (K where the mean gradient is 0).
        One host read. Needs at least 2 micro-batches accumulated since the last ``finish()``."""
        k = self._count
        if k < 2:
            raise ValueError(f"the norm test needs the gradients of at least 2 micro-batches, got {k}: call "
                             f"accumulate() after each micro-batch's backward, and take at least 2 per step")
        have = [i for i, s in enumerate(self._sums) if s is not None]
        if have:  # a few foreach ops, whatever the number of parameters
            sums, squares = [self._sums[i] for i in have], [self._squares[i] for i in have]
            rows = torch.stack([torch.stack(torch._foreach_norm(squares, 1, dtype=torch.float64)),  # (squares >= 0)
                                torch.stack(torch._foreach_norm(sums, 2, dtype=torch.float64)).square()], 1)
            q, s2 = shards.total(self._layout, rows, lambda: have)  # (each over the ranks that shard its tensor)
            variance, norm_sq = (q - s2 / k) / (k - 1), s2 / k ** 2
            for i, mean in zip(have, torch._foreach_div(sums, float(k))):
                p = self.params[i]
                p.grad = placed_like(mean.to(p.dtype), p)
        else:
            variance = norm_sq = torch.zeros((), dtype=torch.float64)
        self._sums = [None] * len(self.params)
        self._squares = [None] * len(self.params)
        self._count = 0
        self.variance, self.grad_norm_sq, self.micro_batches = variance, norm_sq, k
        var, sq = torch.stack([variance, norm_sq]).tolist()  # (the one host read)
        wanted = var / (self.eta ** 2 * sq) if sq > 0 else 0.0
        out = max(k, math.ceil(wanted)) if math.isfinite(wanted) else k
        return out if self.max_micro_batches is None else min(out, max(k, self.max_micro_batches))
