"""uf.NormTest (AdAdaGrad's norm test, issue #24 part 4) against a direct float64 computation on the micro-batches'
gradients, and, with micro-batches of one sample, against the authors' statistic from per-sample gradients."""

import math

import pytest
import torch

import uba_fused as uf

from harness import one_rank_mesh


def _micro_batches(gen, shapes, k, dtype=torch.float32):
    """k micro-batch gradients per parameter: a shared mean plus noise of its own scale per parameter."""
    means = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    noise = [float(torch.rand((), generator=gen)) * 3 for _ in shapes]
    return [[(m + n * torch.randn(m.shape, generator=gen, dtype=torch.float64)).to(dtype) for m, n in zip(means, noise)]
            for _ in range(k)]


@pytest.mark.parametrize("k,eta", [(2, 0.3), (5, 0.5), (9, 2.0)])
def test_the_test_is_the_variance_across_micro_batches(k, eta):
    """p.grad becomes the mean; the variance is sum_j var_k(g_kj) (unbiased), the norm ||mean||^2, and the answer
    max(K, ceil(var / (eta^2 norm^2))), all against float64 sums of the same gradients."""
    gen = torch.Generator().manual_seed(k)
    shapes = [(7, 3), (11,), (1,), (2, 2, 2)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    micro = _micro_batches(gen, shapes, k)
    test = uf.NormTest(params, eta=eta)
    for grads in micro:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        test.accumulate()
        assert all(p.grad is None for p in params)
    answer = test.finish()
    stacked = [torch.stack([grads[i].double() for grads in micro]) for i in range(len(shapes))]
    variance = sum(float(s.var(dim=0, correction=1).sum()) for s in stacked)
    norm_sq = sum(float((s.mean(dim=0) ** 2).sum()) for s in stacked)
    assert float(test.variance) == pytest.approx(variance, rel=1e-6)
    assert float(test.grad_norm_sq) == pytest.approx(norm_sq, rel=1e-6)
    assert test.micro_batches == k
    assert answer == max(k, math.ceil(variance / (eta ** 2 * norm_sq)))
    for p, s in zip(params, stacked):
        torch.testing.assert_close(p.grad, s.mean(dim=0).float(), rtol=1e-6, atol=1e-7)
    assert answer > k if variance / k > eta ** 2 * norm_sq else answer == k  # the test: grow only when it fails


def test_one_sample_micro_batches_give_the_authors_statistic():
    """Micro-batches of one sample each: the answer is ceil(sum_j var_i(per-sample gradient) / (eta^2 ||mean||^2)),
    the authors' norm test, computed here from per-sample gradients by torch.func as their code does."""
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)

    def loss(params, xi, yi):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (xi[None],)), yi[None])

    params = {k: v.detach() for k, v in model.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    variance = sum(float(g.double().var(dim=0, correction=1).sum()) for g in per_sample.values())
    norm_sq = sum(float((g.double().mean(dim=0) ** 2).sum()) for g in per_sample.values())
    eta = 0.2
    test = uf.NormTest(model.parameters(), eta=eta)
    for i in range(16):
        torch.nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        test.accumulate()
    want = math.ceil(variance / (eta ** 2 * norm_sq))
    assert want > 16  # (the case tests the growth)
    assert test.finish() == want


def test_a_parameter_without_a_gradient_counts_zero_and_one_without_any_keeps_none():
    gen = torch.Generator().manual_seed(4)
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    test = uf.NormTest([a, b, c], eta=1.0)
    ga = [torch.randn(3, generator=gen) for _ in range(3)]
    gb = torch.randn(3, generator=gen)
    for i in range(3):
        a.grad = ga[i].clone()
        b.grad = gb.clone() if i == 1 else None
        test.accumulate()
    test.finish()
    torch.testing.assert_close(a.grad, sum(ga) / 3)
    torch.testing.assert_close(b.grad, gb / 3)
    assert c.grad is None
    want = sum(float(torch.stack(gs).double().var(dim=0, correction=1).sum())
               for gs in (ga, [torch.zeros(3), gb, torch.zeros(3)]))
    assert float(test.variance) == pytest.approx(want, rel=1e-6)


def test_the_answer_is_capped_and_never_below_the_micro_batches_taken():
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.zeros(50))
    test = uf.NormTest([p], eta=0.01, max_micro_batches=6)
    for _ in range(4):
        p.grad = torch.randn(50, generator=gen)  # pure noise: the test wants many micro-batches
        test.accumulate()
    assert test.finish() == 6
    quiet = uf.NormTest([p], eta=10.0)
    for _ in range(4):
        p.grad = 5.0 + 0.01 * torch.randn(50, generator=gen)  # no noise to speak of: it passes
        quiet.accumulate()
    assert quiet.finish() == 4


@pytest.mark.parametrize("make,error,match", [
    (lambda p: uf.NormTest([p], eta=0.0), ValueError, "eta must be a finite real number > 0"),
    (lambda p: uf.NormTest([p], eta=math.nan), ValueError, "eta must be a finite real number > 0"),
    (lambda p: uf.NormTest([p], eta=True), ValueError, "eta must be a finite real number > 0"),
    (lambda p: uf.NormTest([p], eta=1.0, max_micro_batches=1), ValueError, "max_micro_batches must be None or"),
    (lambda p: uf.NormTest([], eta=1.0), ValueError, "params is empty"),
    (lambda p: uf.NormTest([p.tolist()], eta=1.0), TypeError, r"params\[0\] must be a torch.Tensor"),
])
def test_bad_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make(torch.nn.Parameter(torch.zeros(3)))


def test_one_micro_batch_and_a_sparse_gradient_are_refused_before_any_change():
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.zeros(4))
    test = uf.NormTest([p], eta=1.0)
    first = torch.randn(4, generator=gen)
    p.grad = first.clone()
    test.accumulate()
    with pytest.raises(ValueError, match="at least 2 micro-batches, got 1"):
        test.finish()
    p.grad = torch.randn(4, generator=gen).to_sparse()
    with pytest.raises(ValueError, match=r"params\[0\]'s gradient must be dense, got layout torch.sparse_coo"):
        test.accumulate()
    second = torch.randn(4, generator=gen)
    p.grad = second.clone()
    test.accumulate()
    test.finish()
    torch.testing.assert_close(p.grad, (first + second) / 2)


def test_dtensor_parameters_on_a_one_rank_mesh_equal_plain_tensors():
    """DTensor parameters placed Shard(0), Shard(1) and Replicate() (one rank: every shard whole) give the plain
    tensors' statistics, answer and mean, the mean written as a DTensor placed as its parameter; a DTensor beside a
    plain tensor, and a gradient placed unlike its parameter, are refused. (2 ranks: tests/test_distributed.py.)"""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    gen = torch.Generator().manual_seed(21)
    shapes, placements = [(4, 3), (2, 5), (6,)], [Shard(0), Shard(1), Replicate()]
    micro = _micro_batches(gen, shapes, 4)
    with one_rank_mesh() as mesh:
        plain = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        placed = [torch.nn.Parameter(DTensor.from_local(torch.zeros(s), mesh, [pl]))
                  for s, pl in zip(shapes, placements)]
        tests = [uf.NormTest(plain, eta=0.4), uf.NormTest(placed, eta=0.4)]
        for grads in micro:
            for params, test in zip((plain, placed), tests):
                for p, g in zip(params, grads):
                    p.grad = DTensor.from_local(g.clone(), mesh, p.placements) if isinstance(p, DTensor) else \
                        g.clone()
                test.accumulate()
        answers = [t.finish() for t in tests]
        assert answers[0] == answers[1]
        assert float(tests[1].variance) == pytest.approx(float(tests[0].variance), rel=1e-12)
        assert float(tests[1].grad_norm_sq) == pytest.approx(float(tests[0].grad_norm_sq), rel=1e-12)
        for p, q in zip(plain, placed):
            assert isinstance(q.grad, DTensor) and q.grad.placements == q.placements
            assert torch.equal(q.grad.to_local(), p.grad)
        with pytest.raises(TypeError, match=r"every parameter to be a DTensor: parameters \[1\]"):
            uf.NormTest([placed[0], plain[1]], eta=1.0)
        test = uf.NormTest(placed[:1], eta=1.0)
        placed[0].grad = DTensor.from_local(torch.zeros(4, 3), mesh, [Replicate()])
        with pytest.raises(ValueError, match=r"params\[0\] is a DTensor placed"):
            test.accumulate()
