"""16-bit parameters kept as exactly as float32 (master_weights="exact") or rounded stochastically ("stochastic"):
registry.CODECS, backends/rounding.py (the spec), csrc/rounding.cuh and backends/triton.py (its twins).

- Exact master weights equal, bit for bit, a float32 model fed the same gradients, whose parameters are rounded to
  the 16-bit dtype after each step (bfloat16: to nearest with ties away from zero, the rounding whose remainder fits
  16 bits; float16: torch's own rounding to nearest even), on every backend.
- Stochastic rounding: the random bits are Philox 4x32-10's (Random123's known answers), every backend produces the
  same bits, each element lands on one of the two bfloat16 neighbours of the float64 oracle's value as the oracle
  drawing the same bits picks it, and the rounding is unbiased within a bound derived from the sample size.
- The option's errors, state-dict conversions between layouts, and GradScaler with float16 masters.
"""

import copy
import math

import numpy as np
import pytest
import torch

import uba_fused as uf
from uba_fused.backends import rounding

import oracle
from harness import CASES, capture_step, f64, make_params, random_grads, set_grads
from test_kernels import DEVICE, EVERY_BACKEND

BY_ID = {c.id: c for c in CASES}
SCHEDULE = uf.UBA(8, phi=0.5, warmup_steps=2, min_lr_ratio=0.1)


def _params(dtype, seed):
    """harness.make_params (odd sizes, 0-size, 1 element, a permuted view, a misaligned view) and a tensor of two
    full chunks and a part, which takes the kernels' 16-byte vector path."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(2 * 4096 + 37, generator=gen).to(DEVICE, dtype).requires_grad_()
    return make_params(DEVICE, dtype, seed) + [big]


def _master(opt, p):
    m = opt.state[p]["master"]
    if m.dtype == torch.int8:
        return rounding.master8_join(p.detach(), m)
    return rounding.master_join(p.detach(), m) if p.dtype == torch.bfloat16 else m


# Pairwise: every backend with both 16-bit dtypes, the rules spread over them (the codecs are the rules' shared
# load and store, so one rule per backend and dtype exercises each path).
EXACT = [("adamw", torch.bfloat16, "torch"), ("lion", torch.float16, "torch"),
         ("adan-clip", torch.bfloat16, "cpu"), ("sgd", torch.float16, "cpu"),
         ("adabelief", torch.bfloat16, "triton"), ("adan", torch.float16, "triton"),
         ("sgd-nesterov", torch.bfloat16, "cuda"), ("adamw", torch.float16, "cuda"),
         ("adamp", torch.bfloat16, "cuda")]  # (its pre-pass reads the master too: the rows' sums are the model's)


_MARKS = {getattr(b, "values", [b])[0]: getattr(b, "marks", ()) for b in EVERY_BACKEND}  # "cpu": CPU parameters only


@pytest.mark.parametrize("case_id, dtype, backend", [pytest.param(c, d, b, id=f"{c}-{str(d)[6:]}-{b}", marks=_MARKS[b])
                                                     for c, d, b in EXACT if b in _MARKS])
def test_exact_master_weights_equal_a_float32_model_bit_for_bit(case_id, dtype, backend):
    case = BY_ID[case_id]
    low = _params(dtype, seed=1)
    ref = [p.detach().float().requires_grad_() for p in low]
    ours = case.make(low, backend=backend, schedule=SCHEDULE, master_weights="exact", state_dtype=torch.float32)
    twin = case.make(ref, backend=backend, schedule=SCHEDULE)
    gen = torch.Generator().manual_seed(2)
    for t in range(6):
        grads = random_grads(low, gen, skip=2 if t == 3 else None)  # a parameter without a gradient keeps its all
        set_grads(low, grads)
        set_grads(ref, [None if g is None else g.float() for g in grads])
        ours.step()
        twin.step()
        for i, (p, q) in enumerate(zip(low, ref)):
            where = f"{case_id}/{dtype}/{backend} step {t} param {i}"
            if p not in ours.state:
                continue
            master = _master(ours, p)
            assert torch.equal(master.view(torch.int32), q.detach().view(torch.int32)), \
                f"{where}: master differs from the float32 model by {(master - q).abs().max().item():.3e}"
            rounded = rounding.master_split(q.detach())[0] if dtype == torch.bfloat16 else q.detach().half()
            assert torch.equal(p.detach().view(torch.int16), rounded.view(torch.int16)), f"{where}: parameter"
            assert float(ours.state[p]["step"]) == float(twin.state[q]["step"])


def test_bfloat16_master_rounds_to_nearest_and_differs_from_ties_to_even_only_on_ties():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 16, generator=gen) * torch.logspace(-30, 30, 1 << 16)
    x[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    bits = rounding.bits(x)
    bits[3:1000] = (bits[3:1000] & ~0xFFFF) | 0x8000  # exact ties
    x = rounding._from_bits(bits)
    p, low = rounding.master_split(x)
    back = rounding.master_join(p, low)
    assert torch.equal(back[3:].view(torch.int32), x[3:].view(torch.int32)), "the split is exact"
    assert torch.isnan(back[2]) and torch.isnan(p[2].float())
    even = x.to(torch.bfloat16)
    differ = ((p.view(torch.int16) != even.view(torch.int16)) & ~x.isnan()).nonzero().flatten()
    assert len(differ) > 400 and ((rounding.bits(x[differ]) & 0xFFFF) == 0x8000).all(), "only ties round otherwise"
    assert (p[differ].float().abs() > even[differ].float().abs()).all(), "a tie rounds away from zero"
    fin = x.isfinite()
    assert ((p.float() - x).abs() <= (even.float() - x).abs())[fin].all(), "as near as ties to even"


def _grid24(x64):
    """The two neighbours of float64 x on the 24-bit grid (float32 values whose 8 low bits are 0), by magnitude, and
    where |x| lies between them (0 at the lower): independently of rounding.py, from frexp."""
    mag = np.abs(x64)
    mant, exp = np.frexp(mag)  # mag = mant 2^exp, mant in [0.5, 1): 16 significant bits after the leading one
    spacing = np.ldexp(1.0, exp - 16)
    lo = np.floor(mag / spacing) * spacing
    return lo, lo + spacing, (mag - lo) / spacing


def test_8bit_correction_rounds_to_24_bits_as_the_float64_oracle_and_splits_exactly():
    """master8_split: the 24-bit value is the lower or upper neighbour on its grid, the upper iff the top 8 random bits
    / 2^8 >= 1 - (where x lies); the parameter is that value rounded to nearest (ties away), and the join gives it
    back; infinities stay, a NaN stays a NaN."""
    gen = torch.Generator().manual_seed(28)
    x = (torch.randn(1 << 16, generator=gen) * torch.logspace(-30, 30, 1 << 16)).float()
    x[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    r = torch.randint(0, 1 << 16, x.shape, generator=gen)
    p, low = rounding.master8_split(x, r)
    assert low.dtype == torch.int8
    back = rounding.master8_join(p, low)
    fin = x.isfinite().numpy()
    lo, hi, frac = _grid24(x.double().numpy()[fin])
    up = (r.numpy()[fin] >> 8) / 2.0**8 >= 1.0 - frac
    want = np.sign(x.double().numpy()[fin]) * np.where(up, hi, lo)
    assert np.array_equal(back.double().numpy()[fin], want), "off the 24-bit grid choice"
    assert torch.equal(p.view(torch.int16), rounding.master_split(back)[0].view(torch.int16)), "the parameter"
    assert back[0] == float("inf") and back[1] == -float("inf") and torch.isnan(back[2]) and torch.isnan(p[2].float())


def test_8bit_correction_is_unbiased():
    """Each of 256 values rounded to 24 bits 4096 times (steps t): within the Hoeffding bound of x (delta 1e-9 per
    mean, a spacing 2^-15 of |x|'s binade), and only ever on its two grid neighbours."""
    gen = torch.Generator().manual_seed(29)
    x = (torch.randn(256, generator=gen) * 10).float()
    n = 4096
    draws = torch.stack([rounding.master8_join(*rounding.master8_split(
        x, rounding.random_bits(x, 5, 3, torch.tensor(t)))).double() for t in range(n)])
    lo, hi, _ = _grid24(x.double().numpy())
    lo, hi = (torch.tensor(np.sign(x.double().numpy()) * v) for v in (lo, hi))
    assert ((draws == lo) | (draws == hi)).all()
    bound = (hi - lo).abs() * math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert ((draws.mean(0) - x.double()).abs() <= bound).all()


# Pairwise: every backend, the rules spread over them (the codec is the rules' shared load and store).
MASTER8 = [("adamw", "torch"), ("adan-clip", "cpu"), ("sgd-nesterov", "triton"), ("adabelief", "cuda"),
           ("lion", "cuda"), ("adamp", "cuda"), ("sgdp", "torch")]


@pytest.mark.parametrize("case_id, backend", [pytest.param(c, b, id=f"{c}-{b}", marks=_MARKS[b])
                                              for c, b in MASTER8 if b in _MARKS])
def test_8bit_master_stays_within_its_roundings_of_a_float32_model(case_id, backend):
    """How far the 24-bit master is from exact: fed the same gradients as a float32 model, it differs from it by
    the roundings it made, at most one 24-bit spacing (2^-15 of the binade) per step (the rules' updates depend on
    the parameter only through weight decay's factor, under 1, and Lion's sign does not depend on it at all); the
    parameter is the master rounded to nearest."""
    case = BY_ID[case_id]
    low = _params(torch.bfloat16, seed=30)
    ref = [p.detach().float().requires_grad_() for p in low]
    ours = case.make(low, backend=backend, schedule=SCHEDULE, master_weights="8bit", seed=9, state_dtype=torch.float32)
    twin = case.make(ref, backend=backend, schedule=SCHEDULE)
    gen = torch.Generator().manual_seed(31)
    worst, bounds = 0.0, [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in low]
    for t in range(6):
        grads = random_grads(low, gen)
        set_grads(low, grads)
        set_grads(ref, [g.float() for g in grads])
        ours.step()
        twin.step()
        for i, (p, q) in enumerate(zip(low, ref)):
            if p.numel() == 0:
                continue
            master = _master(ours, p).double()
            assert torch.equal(p.view(torch.int16), rounding.master_split(master.float())[0].view(torch.int16))
            # this step's rounding: at most a spacing of the binade it happened in (where the value then was)
            magnitude = torch.maximum(master.abs(), q.detach().double().abs()).clamp(min=1e-30)
            spacing = 2.0 ** (torch.frexp(magnitude)[1] - 16)
            bounds[i] += spacing
            err = (master - q.detach().double()).abs()
            assert (err <= bounds[i] * 1.01).all(), f"{case_id}/{backend} step {t} param {i}"
            worst = max(worst, float((err / spacing).max()))
    assert worst > 0.01, "the 24-bit master differs from float32 by its roundings: some must show"


def test_philox_gives_random123s_known_answers():
    # Random123's kat_vectors for philox4x32_10: counter, key, output
    for ctr, key, want in (((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
                           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF),
                            (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
                           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))):
        assert [int(w) for w in rounding.philox(*(torch.tensor(c) for c in ctr), *key)] == list(want)


def _oracle_round(x64, r):
    """The bfloat16 value of float64 x chosen by 16 random bits r (independently of rounding.py): the neighbour of
    larger magnitude iff r / 2^16 >= 1 - (|x| - |down|) / spacing; with the fraction, to tell near-ties."""
    mag = np.abs(x64)
    down = torch.tensor(mag, dtype=torch.float64).float()  # exact to float32 first where x64 is representable
    down_bits = down.view(torch.int32).to(torch.int64) & ~0xFFFF  # truncate the magnitude to bfloat16
    lo = (down_bits.to(torch.int32).view(torch.float32)).double().numpy()
    hi = ((down_bits + 0x10000).to(torch.int32).view(torch.float32)).double().numpy()
    frac = (mag - lo) / (hi - lo)
    up = r / 2.0**16 >= 1.0 - frac
    return np.sign(x64) * np.where(up, hi, lo), frac


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_stochastic_rounding_lands_where_the_float64_oracle_drawing_the_same_bits_lands(backend):
    case = BY_ID["adamw"]
    params = _params(torch.bfloat16, seed=4)
    opt = case.make(params, backend=backend, master_weights="stochastic", seed=77, state_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    ambiguous = total = 0
    for t in range(3):
        grads = random_grads(params, gen)
        set_grads(params, grads)
        before = [(f64(p), {k: f64(v) for k, v in opt.state[p].items() if k != "step"} if p in opt.state else None)
                  for p in params]
        opt.step()
        for slot, (p, g, (p0, s0)) in enumerate(zip(params, grads, before)):
            if p.numel() == 0:
                continue
            s0 = s0 or {n: np.zeros_like(p0) for n in ("exp_avg", "exp_avg_sq")}
            x64, _ = oracle.adamw(p0, f64(g), s0, t + 1, lr=case.kwargs["lr"], **case.hyper(opt.param_groups[0]))
            r = rounding.random_bits(p.detach(), 77, slot, torch.tensor(t)).cpu().numpy()
            want, frac = _oracle_round(x64, r)
            got = f64(p)
            # float32 arithmetic moves x by ~1e-7 relative: a draw within 1e-3 of the threshold may go either way
            near = np.abs(r / 2.0**16 - (1.0 - frac)) < 1e-3
            bad = (got != want) & ~near
            assert not bad.any(), f"{backend} step {t} param {slot}: {bad.sum()} elements off the oracle's choice"
            ambiguous += int(((got != want) & near).sum())
            total += got.size
    assert ambiguous <= 1e-3 * total


@pytest.mark.parametrize("dtype, master_weights", [(torch.bfloat16, "stochastic"), (torch.float16, "stochastic"),
                                                   (torch.bfloat16, "8bit")], ids=["bf16", "fp16", "bf16-8bit"])
@pytest.mark.parametrize("backend", [b for b in EVERY_BACKEND if getattr(b, "values", [b])[0] != "torch"])
def test_every_backend_draws_the_same_bits(backend, dtype, master_weights):
    """Parity stays exact: SGD with momentum and a constant lr computes the same float32 values on every backend, so
    stochastic rounding, keyed by the same (seed, t, tensor, element), must give the same parameters bit for bit.
    The float16 parameters are scaled into its subnormal range (below 2^-14), whose rounding differs."""
    runs = []
    for name in ("torch", backend):
        params = _params(dtype, seed=16)
        lr = 0.05
        if dtype == torch.float16:
            with torch.no_grad():
                for p in params:
                    p.mul_(1e-5)
            lr = 1e-6
        opt = uf.SGD(params, lr=lr, momentum=0.9, backend=name, master_weights=master_weights, seed=3,
                     state_dtype=torch.float32)
        gen = torch.Generator().manual_seed(17)
        for _ in range(4):
            set_grads(params, random_grads(params, gen))
            opt.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16)), f"param {i}: {(p != q).sum()} elements differ"
        if "master" in opt_a.state[p]:
            assert torch.equal(opt_a.state[p]["master"], opt_b.state[q]["master"]), f"param {i}: its correction"


def test_stochastic_rounding_is_unbiased_and_hits_only_the_two_neighbours():
    """Each of 256 float32 values rounded N = 4096 times (steps t), and 4096 elements of one value at one step: the
    mean of N draws, each within one spacing s of x, lies within s * sqrt(ln(2 / delta) / (2 N)) of x but with
    probability delta (Hoeffding); delta = 1e-9 over the 512 means tested."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(256, generator=gen) * 10).float()
    n = 4096
    draws = torch.stack([rounding.round_stochastic(x, rounding.random_bits(x, 5, 3, torch.tensor(t))).double()
                         for t in range(n)])
    down = rounding._from_bits(rounding.bits(x) & ~0xFFFF).double()
    up = rounding._from_bits((rounding.bits(x) & ~0xFFFF) + 0x10000).double()
    assert ((draws == down) | (draws == up)).all(), "a draw off the two neighbours"
    bound = (up - down).abs() * math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert ((draws.mean(0) - x.double()).abs() <= bound).all()
    one = torch.full((n,), float(x[0]))
    across = rounding.round_stochastic(one, rounding.random_bits(one, 5, 3, torch.tensor(0))).double()
    assert (across.mean() - float(x[0])).abs() <= float(bound[0])
    assert 0 < (across == up[0]).sum() < n


def test_float16_stochastic_rounding_is_unbiased_in_its_normal_and_subnormal_ranges():
    """As for bfloat16, over float16's normal range (13 dropped bits, exact) and its subnormal one (spacing 2^-24: a
    bias under 2^-16 of it, added to the Hoeffding bound); past its largest value a draw may be inf."""
    gen = torch.Generator().manual_seed(19)
    x = torch.cat([torch.randn(128, generator=gen) * 10, torch.rand(128, generator=gen) * 2.0**-14 * 1.5]).float()
    x[-1] = 65510.0  # between float16's largest (65504) and inf
    n = 4096
    draws = torch.stack([rounding.round_stochastic_half(x, rounding.random_bits(x, 8, 1, torch.tensor(t)))
                         for t in range(n)]).double()
    mag = x.double().abs()  # float16's grid around each |x|: spacing 2^-24 below 2^-14, else 2^(exponent - 10)
    spacing = torch.where(mag < 2.0**-14, torch.full_like(mag, 2.0**-24), 2.0 ** (mag.log2().floor() - 10))
    down = (mag / spacing).floor() * spacing
    up = torch.where(down + spacing > 65504, torch.inf, down + spacing)
    down, up = torch.sign(x.double()) * down, torch.sign(x.double()) * up
    assert ((draws == down) | (draws == up)).all(), "a draw off the two neighbours"
    bound = spacing * (math.sqrt(math.log(2 / 1e-9) / (2 * n)) + 2.0**-16)
    err = (draws.mean(0) - x.double()).abs()
    assert (err[:-1] <= bound[:-1]).all(), f"biased: {(err - bound).max()}"
    assert torch.isinf(draws[:, -1]).any() and (draws[:, -1] == 65504).any()
    assert (x[128:-1].abs() < 2.0**-14).sum() > 50  # the subnormal range is covered


def test_stochastic_bits_are_keyed_by_seed_step_and_tensor():
    x = torch.full((1000,), 1.0 + 2.0**-8)  # halfway between two bfloat16 values
    t0 = torch.tensor(0)
    a = rounding.round_stochastic(x, rounding.random_bits(x, 1, 0, t0))
    assert torch.equal(a, rounding.round_stochastic(x, rounding.random_bits(x, 1, 0, t0)))
    for other in (rounding.random_bits(x, 2, 0, t0), rounding.random_bits(x, 1, 1, t0),
                  rounding.random_bits(x, 1, 0, torch.tensor(1))):
        b = rounding.round_stochastic(x, other)
        assert 300 < (a != b).sum() < 700  # independent draws of a fair coin differ about half the time


def test_bad_combinations_raise_naming_the_argument():
    p32, bf, half = torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.bfloat16, requires_grad=True), \
        torch.zeros(3, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match=r"master_weights='exact' keeps the updates of 16-bit parameters, but "
                                         r"params\[1\] is torch.float32"):
        uf.AdamW([bf, p32], master_weights="exact")
    with pytest.raises(ValueError, match=r"master_weights='stochastic' keeps the updates of 16-bit parameters, but "
                                         r"params\[0\] is torch.float64"):
        uf.Lion([half, torch.zeros(2, dtype=torch.float64, requires_grad=True)][1:], master_weights="stochastic")
    with pytest.raises(ValueError, match="master_weights must be None, 'exact', 'stochastic' or '8bit', got 'fp32'"):
        uf.SGD([bf], lr=0.1, master_weights="fp32")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*53\), got -1"):
        uf.Adan([bf], master_weights="stochastic", seed=-1)
    with pytest.raises(ValueError, match=r"master_weights='8bit' keeps an 8-bit correction beside bfloat16 parameters "
                                         r"only, but params\[1\] is torch.float16"):
        uf.AdamW([bf, half], master_weights="8bit")
    opt = uf.AdamW([{"params": [p32]}, {"params": [bf], "master_weights": "exact"}])  # per group
    assert [g["master_weights"] for g in opt.param_groups] == [None, "exact"]


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_state_dicts_convert_between_layouts(backend):
    """A saved group's master_weights is loaded as its other values are (a group that lacks it keeps the
    optimizer's); then a master saved with the state dict is taken back, a layout that keeps none drops it, and a
    state dict without one gives a master made from the parameter as it is."""
    gen = torch.Generator().manual_seed(8)
    a = [torch.randn(300, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_(),
         torch.randn(40, generator=gen).to(DEVICE, torch.float16).requires_grad_()]
    opt = uf.AdamW(a, lr=1e-2, master_weights="exact", backend=backend)
    for _ in range(3):
        set_grads(a, random_grads(a, gen))
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # as torch.load gives it: tensors of its own
    masters = [opt.state[p]["master"].clone() for p in a]
    assert masters[0].dtype == torch.int16 and masters[0].ne(0).any() and masters[1].dtype == torch.float32
    b = [p.detach().clone().requires_grad_() for p in a]
    same = uf.AdamW(b, lr=1e-2, master_weights="exact", backend=backend)
    same.load_state_dict(sd)
    assert all(torch.equal(same.state[q]["master"], m) for q, m in zip(b, masters))
    grads = random_grads(a, gen)
    for params, o in ((a, opt), (b, same)):
        set_grads(params, grads)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b)), "the reloaded run continues bit for bit"

    plain = uf.AdamW([p.detach().clone().requires_grad_() for p in a], lr=1e-2, backend=backend)
    plain.load_state_dict({**sd, "param_groups": [{**g, "master_weights": None} for g in sd["param_groups"]]})
    assert all("master" not in st for st in plain.state.values())

    c = [p.detach().clone().requires_grad_() for p in a]
    again = uf.AdamW(c, lr=1e-2, master_weights="exact", backend=backend)
    sd = plain.state_dict()  # as a torch.optim.AdamW state dict, its groups say nothing of master weights
    again.load_state_dict({**sd, "param_groups": [{k: v for k, v in g.items() if k != "master_weights"}
                                                  for g in sd["param_groups"]]})
    assert torch.equal(again.state[c[0]]["master"], torch.zeros(300, dtype=torch.int16, device=DEVICE))
    assert torch.equal(again.state[c[1]]["master"], c[1].detach().float())


def test_a_remainder_loads_as_an_8bit_correction_and_back():
    """master_weights "exact" -> "8bit": the 16-bit remainder rounded to its top 8 bits (to nearest, ties up; the
    largest clamped), so the 24-bit master is within half its spacing of the exact one (a whole one where clamped);
    "8bit" -> "exact": the correction's bits, exactly."""
    gen = torch.Generator().manual_seed(32)
    a = [torch.randn(3000, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()]
    exact = uf.AdamW(a, lr=1e-2, master_weights="exact")
    for _ in range(3):
        set_grads(a, random_grads(a, gen))
        exact.step()
    sd = copy.deepcopy(exact.state_dict())
    r16 = sd["state"][0]["master"].cpu().numpy().astype(np.int64)
    b = [p.detach().clone().requires_grad_() for p in a]
    eight = uf.AdamW(b, lr=1e-2, master_weights="8bit")
    eight.load_state_dict({**sd, "param_groups": [{**g, "master_weights": "8bit"} for g in sd["param_groups"]]})
    c8 = eight.state[b[0]]["master"]
    assert c8.dtype == torch.int8
    assert np.array_equal(c8.cpu().numpy(), np.clip(np.floor(r16 / 256 + 0.5), -128, 127))
    err = (rounding.master8_join(b[0].detach(), c8) - rounding.master_join(a[0].detach(), exact.state[a[0]]["master"]))
    spacing = 2.0 ** (torch.frexp(a[0].detach().float().abs())[1] - 16)
    assert (err.abs() <= spacing).all() and (err.abs() <= spacing / 2).float().mean() > 0.99
    c = [p.detach().clone().requires_grad_() for p in b]
    back = uf.AdamW(c, lr=1e-2, master_weights="exact")
    sd8 = eight.state_dict()
    back.load_state_dict({**sd8, "param_groups": [{**g, "master_weights": "exact"} for g in sd8["param_groups"]]})
    assert torch.equal(back.state[c[0]]["master"], c8.to(torch.int16) * 256)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_a_group_switched_between_exact_and_8bit_masters_converts_its_master(backend):
    """master_weights set on a param group between steps: the next step takes the master over in the new kind (as
    a state-dict load converts it), never reads an int16 remainder as an int8 correction."""
    gen = torch.Generator().manual_seed(33)
    a = [torch.randn(5000, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()]
    opt = uf.SGD(a, lr=1e-3, momentum=0.9, master_weights="exact", backend=backend)
    for _ in range(3):
        set_grads(a, random_grads(a, gen))
        opt.step()
    r16 = opt.state[a[0]]["master"].clone()
    opt.param_groups[0]["master_weights"] = "8bit"
    opt.param_groups[0]["lr"] = 0.0  # the step then changes no parameter: the master must be the converted one
    set_grads(a, random_grads(a, gen))
    opt.step()
    c8 = opt.state[a[0]]["master"]
    assert c8.dtype == torch.int8
    assert torch.equal(c8, ((r16.to(torch.int32) + 128) >> 8).clamp(max=127).to(torch.int8))
    opt.param_groups[0]["master_weights"] = "exact"
    opt.step()
    assert torch.equal(opt.state[a[0]]["master"], c8.to(torch.int16) * 256)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_a_parameter_written_by_someone_else_is_taken_as_written(backend):
    """A model state dict loaded in place: an fp16 parameter's copy follows what was written instead of overwriting
    it; a bf16 one's master restarts from it once its low bits are dropped (del opt.state[p]["master"]). At lr 0
    the step changes nothing else, so the masters must then be the written values exactly."""
    gen = torch.Generator().manual_seed(18)
    half = torch.randn(300, generator=gen).to(DEVICE, torch.float16).requires_grad_()
    bf = torch.randn(300, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    opt = uf.AdamW([half, bf], lr=1e-2, master_weights="exact", backend=backend)
    for _ in range(2):
        set_grads([half, bf], random_grads([half, bf], gen))
        opt.step()
    assert opt.state[bf]["master"].ne(0).any() and not torch.equal(opt.state[half]["master"], half.detach().float())
    written = [torch.randn(300, generator=gen).to(DEVICE, p.dtype) for p in (half, bf)]
    with torch.no_grad():
        half.copy_(written[0])
        bf.copy_(written[1])
    del opt.state[bf]["master"]
    opt.param_groups[0]["lr"] = 0.0
    set_grads([half, bf], random_grads([half, bf], gen))
    opt.step()
    assert torch.equal(half.detach(), written[0]) and torch.equal(opt.state[half]["master"], written[0].float())
    assert torch.equal(bf.detach(), written[1]) and not opt.state[bf]["master"].any()


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_float16_masters_under_gradscaler_equal_a_float32_model(backend):
    """fp16 training as it is meant: float16 parameters with float32 masters, GradScaler's scale divided out in the
    kernel, its inf steps skipped; against a float32 model fed the unscaled gradients (exact: the scales are powers
    of two)."""
    low = _params(torch.float16, seed=9)[:-1]
    ref = [p.detach().float().requires_grad_() for p in low]
    ours = uf.AdamW(low, lr=1e-2, master_weights="exact", state_dtype=torch.float32, backend=backend)
    twin = uf.AdamW(ref, lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**8, growth_interval=2)
    gen = torch.Generator().manual_seed(10)
    for t in range(5):
        grads = [g.half() for g in random_grads(low, gen)]
        for p, g in zip(low, grads):
            p.grad = scaler.scale(g.float()).half()
        if t == 2:
            low[0].grad[0] = float("inf")
        scaler.step(ours)
        scaler.update()
        if t != 2:
            set_grads(ref, [g.float() for g in grads])
            twin.step()
        for p, q in zip(low, ref):
            assert torch.equal(ours.state[p]["master"], q.detach()) and torch.equal(p.detach(), q.detach().half())


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAYOUTS = {"bf16-exact": (torch.bfloat16, {"master_weights": "exact"}),
           "fp16-exact": (torch.float16, {"master_weights": "exact"}),
           "bf16-stochastic": (torch.bfloat16, {"master_weights": "stochastic"}),
           "fp16-stochastic": (torch.float16, {"master_weights": "stochastic"}),
           "bf16-8bit": (torch.bfloat16, {"master_weights": "8bit", "state_dtype": torch.float32}),
           "fp32-bf16-state": (torch.float32, {"state_dtype": torch.bfloat16}),
           "bf16-8bit-bf16-state": (torch.bfloat16, {"master_weights": "8bit", "state_dtype": torch.bfloat16}),
           "fp32-8bit-state": (torch.float32, {"state_dtype": torch.int8}),
           "bf16-8bit-8bit-state": (torch.bfloat16, {"master_weights": "8bit", "state_dtype": torch.int8})}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_graph_replays_of_each_layout_equal_eager_steps(layout, backend):
    """A captured step replays the layout's loads and stores, and stochastic rounding (of the parameter, its master or
    its state) draws new bits at every replay (the step counter t is read on the device): bit for bit the eager run,
    and no eager step or replay syncs."""
    dtype, options = LAYOUTS[layout]

    def run(graph):
        ps = _params(dtype, seed=12)
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = uf.Adan(ps, lr=1e-2, backend=backend, seed=5, schedule=uf.UBA(9, warmup_steps=2), max_grad_norm=1.0,
                      **options)
        gen = torch.Generator().manual_seed(13)
        grads = [random_grads(ps, gen) for _ in range(8)]
        static = [p.grad for p in ps]

        def load(gs):
            for s, g in zip(static, gs):
                s.copy_(g)

        load(grads[0])
        opt.step()
        if graph:
            g = capture_step(opt)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for gs in grads[1:]:
                load(gs)
                g.replay() if graph else opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return ps, opt

    (a, opt_a), (b, opt_b) = run(False), run(True)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for name, s in opt_a.state[p].items():  # the step, the state and the master
            assert torch.equal(s, opt_b.state[q][name]), name


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_gradscaler_steps_with_float16_masters_never_sync(backend):
    ps = _params(torch.float16, seed=14)
    opt = uf.AdamW(ps, lr=1e-3, backend=backend, master_weights="exact", max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0)  # scaled gradients stay finite in fp16
    gen = torch.Generator().manual_seed(15)
    grads = [[g.float() for g in random_grads(ps, gen)] for _ in range(4)]

    def step(gs):
        for p, g in zip(ps, gs):
            p.grad = scaler.scale(g).half()
        scaler.step(opt)
        scaler.update()

    step(grads[0])  # the first step makes the state and the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads[1:]:
            step(gs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(float(opt.state[p]["step"]) == 4.0 for p in ps)
