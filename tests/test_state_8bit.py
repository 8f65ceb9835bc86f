"""8-bit optimizer state (state_dtype=torch.int8): int8 codes per element and a float32 scale per block of
registry.QBLOCK elements, on a companded map (sign(x) |x|^1/2 for signed slots, x^1/4 for slots that are never
negative), rounded stochastically by default and to nearest as the control.

- The spec (rounding.quantize / dequantize) against a float64 re-derivation of the map; stochastic codes unbiased.
- From exact moments (betas of 1/2, gradients of few bits), every backend writes the codes and scales the spec gives
  for the float64 oracle's moments with the same random bits, bit for bit; the two kernels write the same bits over
  several steps in every 8-bit storage (vector and element paths).
- A run with 8-bit state follows a run with float32 state; small parameters keep float32 state.
- State dicts: a resumed run equals an uninterrupted one bit for bit; 8-bit and float state convert both ways.
- DTensor parameters: 8-bit state where each shard is whole rows of whole blocks, float32 state elsewhere.
- Errors: parameters it is not built for, codes without their scales.
"""

import copy

import numpy as np
import pytest
import torch

import uba_fused as uf
from uba_fused import registry
from uba_fused.optim import blockwise
from uba_fused.backends import rounding

from harness import one_rank_mesh
from test_kernels import DEVICE
from test_precision import _MARKS

INT8 = torch.int8
QB = registry.QBLOCK
BACKENDS = [pytest.param(b, marks=_MARKS[b]) for b in ("torch", "cpu", "triton", "cuda") if b in _MARKS]


def _companded(x, positive):
    z = np.sqrt(np.abs(x))
    return np.sqrt(z) if positive else z


@pytest.mark.parametrize("positive", [False, True], ids=["signed", "positive"])
def test_quantize_is_the_companded_map_to_the_nearest_code(positive):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5 * QB + 77, generator=gen) * torch.logspace(-6, 2, 5 * QB + 77)  # magnitudes over 8 decades
    x[QB:2 * QB] = 0.0  # a block of zeros
    if positive:
        x = x.abs()
    codes, absmax = rounding.quantize(x, positive, None, QB)
    levels = 255 if positive else 127
    z = _companded(x.double().numpy(), positive)
    zb = np.pad(z, (0, -len(z) % QB)).reshape(-1, QB)
    np.testing.assert_allclose(absmax.double().numpy(), zb.max(1), rtol=2e-7)  # float32 square roots
    a = np.repeat(absmax.double().numpy(), QB)[:len(z)]
    y = np.divide(z * levels, a, out=np.zeros_like(z), where=a > 0)
    q = codes.numpy().astype(np.int64) & 0xFF if positive else np.abs(codes.numpy().astype(np.int64))
    assert np.abs(q - y).max() <= 0.5 + 1e-5, "a code is not the nearest one"
    assert (q[QB:2 * QB] == 0).all() and absmax[1] == 0
    if not positive:
        assert (np.sign(codes.numpy()) == np.where(q > 0, np.sign(x.numpy()), 0)).all()
    w = q * a / levels  # the decoded value, in float64
    want = w ** 4 if positive else np.sign(x.numpy()) * w ** 2
    got = rounding.dequantize(codes, absmax, positive, QB).double().numpy()
    np.testing.assert_allclose(got, want, rtol=3e-6, atol=1e-30)
    rel = np.abs(got - x.numpy()) / np.maximum(np.abs(x.numpy()), 1e-30)
    # within 4x of its block's largest companded value, y >= levels / 4: half a code is at most 2 / levels of z, and x
    # is z^2 (z^4): 4 / levels (8 / levels) of x, to first order
    big = z >= 0.25 * a
    bound = (8.0 if positive else 4.0) / levels
    assert bound / 2 < rel[big].max() < 1.05 * bound, rel[big].max()


def test_stochastic_codes_are_unbiased():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2 * QB, generator=gen)
    z = _companded(x.double().numpy(), False)
    draws = []
    for t in range(400):
        r = rounding.random_bits(x, 5, 0, torch.tensor(t), 1)
        codes, absmax = rounding.quantize(x, False, r, QB)
        near, _ = rounding.quantize(x, False, None, QB)
        assert ((codes.long() - near.long()).abs() <= 1).all()  # one of the two neighbours
        draws.append(np.abs(codes.numpy().astype(np.float64)) * np.repeat(absmax.double().numpy(), QB) / 127)
    mean = np.mean(draws, 0)
    spacing = np.repeat(absmax.double().numpy(), QB) / 127
    assert np.abs(mean - z).max() < 0.1 * spacing.max(), "stochastic codes are biased"  # std error 0.025 spacing
    assert np.abs(mean - z).mean() < 0.03 * spacing.mean()


def _exact_params(gen, n=2 * 4096 + 300):
    return [torch.randn(3, n // 3, generator=gen).to(DEVICE).requires_grad_(),
            torch.randn(5000, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()]


def _few_bits(shape, gen):
    """Gradients of 6 significant bits over 2^-8..2^3: their squares and halves are exact in float32."""
    m = torch.randint(32, 64, shape, generator=gen).float()
    return (m * 2.0 ** torch.randint(-13, -2, shape, generator=gen).float() *
            (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(DEVICE)


@pytest.mark.parametrize("how", ["stochastic", "nearest"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_from_exact_moments_are_the_specs_on_every_backend(backend, how):
    gen = torch.Generator().manual_seed(6)
    params = _exact_params(gen)
    opt = uf.AdamW(params, lr=1e-3, betas=(0.5, 0.5), weight_decay=0.0, backend=backend, state_dtype=INT8,
                   state_rounding=how, seed=17)
    grads = [_few_bits(p.shape, gen).to(p.dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for slot, (p, g) in enumerate(zip(params, grads)):
        g64 = g.double().cpu()
        exact = {"exp_avg": 0.5 * g64, "exp_avg_sq": 0.5 * g64 * g64}  # the float64 oracle's first moments
        st = opt.state[p]
        assert st["absmax"].shape == (2, -(-p.numel() // QB))
        for j, (n, positive) in enumerate((("exp_avg", False), ("exp_avg_sq", True))):
            x = exact[n].float()  # exact in float32
            r = None if how == "nearest" else rounding.random_bits(x, 17, slot, torch.tensor(0), 1 + j)
            codes, absmax = rounding.quantize(x, positive, r, QB)
            assert st[n].dtype == INT8
            assert torch.equal(st[n].cpu(), codes), f"{backend} {n}: {(st[n].cpu() != codes).sum()} codes differ"
            assert torch.equal(st["absmax"][j].cpu(), absmax), f"{backend} {n}: block scales differ"


# Every 8-bit storage once, the rule in turn (AdamW, AdaBelief, Lion, SGD with momentum, Adan, Adagrad, AdamP, SGDP).
_RULES_8BIT = ("adamw", "adabelief", "lion", "sgd", "adan", "adagrad", "adamp", "sgdp")
_KERNEL_CASES = [(rule, dtype, mw, how) for i, (dtype, mw, how) in enumerate(
    [(d, OPTION, h) for d, OPTION in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "exact"),
                                      (torch.bfloat16, "stochastic"), (torch.bfloat16, "8bit"))
     for h in ("stochastic", "nearest")]) for rule in [_RULES_8BIT[i % len(_RULES_8BIT)]]]


@pytest.mark.skipif("triton" not in _MARKS or "cuda" not in _MARKS, reason="needs both kernel backends")
@pytest.mark.parametrize("rule, dtype, master_weights, how", _KERNEL_CASES,
                         ids=[f"{r}-{str(d)[6:]}-{m}-{h}" for r, d, m, h in _KERNEL_CASES])
def test_both_kernels_write_the_same_8bit_state_bits(rule, dtype, master_weights, how):
    """Three steps from fresh state: parameters, masters, codes and scales equal bit for bit, on a tensor of full
    chunks (the vector paths) and a misaligned view with a tail (the element paths)."""
    make = {"adamw": uf.AdamW, "adabelief": uf.AdaBelief, "lion": uf.Lion, "adan": uf.Adan,
            "sgd": lambda ps, **kw: uf.SGD(ps, momentum=0.9, **kw),
            "adagrad": lambda ps, **kw: uf.Adagrad(ps, initial_accumulator_value=0.1, **kw),
            # (delta 5 projects every row of the random gradients: |cos| about 1 / 64 against 5 / 64)
            "adamp": lambda ps, **kw: uf.AdamP(ps, delta=5.0, weight_decay=0.1, **kw),
            "sgdp": lambda ps, **kw: uf.SGDP(ps, momentum=0.9, delta=5.0, weight_decay=0.1, **kw)}[rule]
    out = {}
    for backend in ("triton", "cuda"):
        gen = torch.Generator().manual_seed(13)
        params = [torch.randn(3, 4096, generator=gen).to(DEVICE, dtype).requires_grad_(),
                  torch.randn(4096 + 701, generator=gen).to(DEVICE, dtype)[1:].detach().requires_grad_()]
        opt = make(params, lr=1e-2, backend=backend, state_dtype=INT8, state_rounding=how,
                   master_weights=master_weights, seed=5)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
            opt.step()
        out[backend] = [t for p in params for t in (p.detach(), *(v for _, v in sorted(opt.state[p].items())))]
    assert len(out["triton"]) == len(out["cuda"])
    for a, b in zip(out["triton"], out["cuda"]):
        assert torch.equal(a, b), f"{(a != b).sum()} of {a.numel()} differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_state_follows_float32_state(backend):
    """Adam on a least-squares problem: the 8-bit run stays within a few per cent of the float32 run's path."""
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(64, 48, generator=gen).to(DEVICE)
    target = torch.randn(64, 128, generator=gen).to(DEVICE)
    w0 = (torch.randn(48, 128, generator=gen) * 0.1).to(DEVICE)
    runs = {}
    for name, dtype in (("fp32", None), ("int8", INT8)):
        w = w0.clone().requires_grad_()
        opt = uf.AdamW([w], lr=3e-3, weight_decay=0.0, backend=backend, state_dtype=dtype, seed=1)
        for _ in range(12):
            opt.zero_grad(set_to_none=True)
            (a @ w - target).pow(2).mean().backward()
            opt.step()
        runs[name] = w.detach().double()
    travelled = (runs["fp32"] - w0.double()).norm()
    off = (runs["int8"] - runs["fp32"]).norm()
    assert off < 0.03 * travelled, f"8-bit state {off / travelled:.3f} of the distance off float32's path"
    assert off > 0  # it is quantized


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_adagrad_sum_starts_at_its_initial_value(backend):
    """Rule.initial reaches 8-bit state: after one step the decoded sum is initial_accumulator_value + g^2 (to the
    codes' precision, 2% of the largest; without the initial value the sum would be g^2, off by 0.5)."""
    gen = torch.Generator().manual_seed(15)
    p = torch.randn(2 * 4096 + 100, generator=gen).to(DEVICE).requires_grad_()
    g = torch.randn(p.shape, generator=gen) * 0.2
    opt = uf.Adagrad([p], lr=1e-2, initial_accumulator_value=0.5, backend=backend, state_dtype=INT8,
                     state_rounding="nearest")
    p.grad = g.to(DEVICE)
    opt.step()
    st = opt.state[p]
    assert st["sum"].dtype == INT8
    got = blockwise.value(st, "adagrad", "sum").double().cpu()
    want = 0.5 + g.double() ** 2
    assert (got - want).abs().max() < 0.02 * want.max(), (got - want).abs().max()


def test_small_parameters_keep_float32_state_and_bytes_are_counted():
    gen = torch.Generator().manual_seed(11)
    small = torch.randn(registry.QUANTIZE_MIN - 1, generator=gen).requires_grad_()
    big = torch.randn(registry.QUANTIZE_MIN + 1, generator=gen).requires_grad_()
    bf = torch.randn(64, 128, generator=gen).to(torch.bfloat16).requires_grad_()
    opt = uf.AdamW([small, big, bf], lr=1e-3, state_dtype=INT8, master_weights=None)
    for p in (small, big, bf):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()
    assert {opt.state[small][n].dtype for n in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    assert "absmax" not in opt.state[small]
    for p in (big, bf):
        assert {opt.state[p][n].dtype for n in ("exp_avg", "exp_avg_sq")} == {INT8}
        assert opt.state[p]["absmax"].shape == (2, -(-p.numel() // QB))
    kept = sum(t.numel() * t.element_size() for n, t in opt.state[bf].items() if n != "step") / bf.numel()
    assert kept == 2 + 2 * 4 / QB  # two codes and two scales per block


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_state_dicts_resume_bit_for_bit_and_convert(backend):
    gen = torch.Generator().manual_seed(9)
    params = _exact_params(gen)
    opt = uf.Adan(params, lr=1e-3, backend=backend, state_dtype=INT8, seed=3)
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in params] for _ in range(4)]

    def run(o, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        o.step()

    for gs in grads[:2]:
        run(opt, params, gs)
    saved = copy.deepcopy(opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt2 = uf.Adan(twin, lr=1e-3, backend=backend, state_dtype=INT8, seed=3)
    opt2.load_state_dict(saved)
    for o, ps in ((opt, params), (opt2, twin)):
        for gs in grads[2:]:
            run(o, ps, gs)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        for n, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][n]), n
    # 8-bit into float32 state: the decoded values; and back: the codes of those values, to nearest
    wide = uf.Adan([p.detach().clone().requires_grad_() for p in params], lr=1e-3, backend=backend,
                   state_dtype=torch.float32)
    as_saved = copy.deepcopy(saved)
    for g in as_saved["param_groups"]:
        del g["state_dtype"]  # (a saved group's state_dtype loads with it, as its other options)
    wide.load_state_dict(as_saved)
    for i, p in enumerate(wide.param_groups[0]["params"]):
        st = saved["state"][i]
        for j, n in enumerate(registry.RULES["adan"].states):
            want = rounding.dequantize(st[n], st["absmax"][j], n in registry.RULES["adan"].positive, QB)
            assert wide.state[p][n].dtype == torch.float32 and torch.equal(wide.state[p][n], want), n
        assert "absmax" not in wide.state[p]
    narrow = uf.Adan([p.detach().clone().requires_grad_() for p in params], lr=1e-3, backend=backend,
                     state_dtype=INT8)
    back = wide.state_dict()
    for g in back["param_groups"]:
        del g["state_dtype"]
    narrow.load_state_dict(back)
    for i, p in enumerate(narrow.param_groups[0]["params"]):
        for j, n in enumerate(registry.RULES["adan"].states):
            codes, absmax = rounding.quantize(wide.state[wide.param_groups[0]["params"][i]][n], n in
                                              registry.RULES["adan"].positive, None, QB)
            assert torch.equal(narrow.state[p][n], codes) and torch.equal(narrow.state[p]["absmax"][j], absmax), n


def test_torch_optim_state_loads_quantized_and_a_group_changed_to_float_decodes():
    gen = torch.Generator().manual_seed(10)
    p = torch.randn(80, 70, generator=gen, requires_grad=True)
    ref = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(p.shape, generator=gen)
    ref.step()
    opt = uf.AdamW([p], lr=1e-3, state_dtype=INT8)
    opt.load_state_dict(ref.state_dict())
    codes, absmax = rounding.quantize(ref.state[p]["exp_avg_sq"], True, None, QB)
    assert torch.equal(opt.state[p]["exp_avg_sq"], codes) and torch.equal(opt.state[p]["absmax"][1], absmax)
    decoded = rounding.dequantize(codes, absmax, True, QB)
    opt.param_groups[0]["state_dtype"] = None  # float32 from now on: the codes are decoded, the scales dropped
    p.grad = torch.randn(p.shape, generator=gen)
    before = opt.state[p]["exp_avg_sq"]
    opt._fit_state()
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32 and "absmax" not in opt.state[p]
    assert torch.equal(opt.state[p]["exp_avg_sq"], decoded) and before.dtype == INT8


@pytest.mark.parametrize("dtype, match", [(torch.float16, "float32 and bfloat16 parameters"),
                                          (torch.float64, "float32 and bfloat16 parameters")])
def test_8bit_state_refuses_parameters_it_is_not_built_for(dtype, match):
    with pytest.raises(ValueError, match=match):
        uf.AdamW([torch.zeros(4096, dtype=dtype, requires_grad=True)], state_dtype=INT8)


def test_8bit_state_codes_without_their_scales_are_refused():
    gen = torch.Generator().manual_seed(12)
    p = torch.randn(4096, generator=gen).requires_grad_()
    opt = uf.AdamW([p], lr=1e-3, state_dtype=INT8)
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["absmax"]
    with pytest.raises(ValueError, match="without its block scales"):
        uf.AdamW([p], lr=1e-3, state_dtype=INT8).load_state_dict(sd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_parameters_keep_8bit_state_where_shards_are_whole_rows_of_blocks(backend):
    """On a one-rank mesh a row-blocked DTensor parameter keeps 8-bit state bit for bit as its plain twin does (the
    local shard is the whole tensor, so even the random bits agree), with its scales a DTensor placed as its rows;
    a 1-D one and one whose rows split blocks keep float32 state."""
    from torch.distributed.tensor import DTensor, Shard
    with one_rank_mesh(DEVICE) as mesh:
        gen = torch.Generator().manual_seed(14)
        shapes = [(24, 512), (5000,), (40, 300)]
        values = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        plain = [v.clone().requires_grad_() for v in values]
        placed = [torch.nn.Parameter(DTensor.from_local(v.clone(), mesh, [Shard(0)])) for v in values]
        make = lambda ps: uf.AdamW(ps, lr=1e-2, weight_decay=0.1, state_dtype=INT8, backend=backend)  # noqa: E731
        ref, opt = make(plain), make(placed)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
            for p, q, g in zip(plain, placed, grads):
                p.grad, q.grad = g.clone(), DTensor.from_local(g.clone(), mesh, [Shard(0)])
            ref.step()
            opt.step()
        st, want = opt.state[placed[0]], ref.state[plain[0]]
        assert isinstance(st["absmax"], DTensor) and st["absmax"].placements == (Shard(1),)
        assert st["absmax"].shape == want["absmax"].shape == (2, 24, 2)
        for n in ("exp_avg", "exp_avg_sq", "absmax"):
            assert st[n].dtype == want[n].dtype and torch.equal(st[n].full_tensor(), want[n]), n
        assert torch.equal(placed[0].full_tensor(), plain[0].detach())
        for q in placed[1:]:
            assert opt.state[q]["exp_avg"].dtype == torch.float32 and "absmax" not in opt.state[q]
