"""How a parameter is kept between steps (registry.CODECS), as readable PyTorch: the spec that csrc/rounding.cuh and
backends/triton.py compute bit for bit.

- "remainder": a bfloat16 parameter is the high 16 bits of its float32 master; the optimizer keeps the low 16 bits
  (``state["master"]``, int16, signed). The parameter is the master rounded to nearest with ties away from zero:
  adding half a unit to the magnitude's bits, so that the remainder lies in [-2^15, 2^15) and fits. (Ties to even
  would need a 17th bit: a tie rounded down leaves +2^15.) The two give the master back exactly.
- "copy": a float16 parameter with a float32 copy of its master (``state["master"]``); the parameter is its rounding
  to nearest. A parameter someone else wrote since (it is no longer the copy's rounding) is taken as it is.
- "correction": a bfloat16 parameter and the next 8 bits of its master (``state["master"]``, int8, signed): a 24-bit
  master, the float32 whose low 8 bits are 0. The update's float32 result is rounded to that grid stochastically (the
  top 8 of its 16 random bits carried into the 8 bits dropped), then split as "remainder" splits it: the remainder of
  a 24-bit value is a multiple of 2^8 in [-2^15, 2^15), so its top 8 bits fit an int8.
- "stochastic": a 16-bit parameter rounded up or down at random, with probability by distance: unbiased (float16:
  see ``round_stochastic_half``). The 16
  random bits of each element come from Philox 4x32-10 (Salmon et al., SC'11; what ``triton.language.philox``
  computes) with key (seed low 32 bits, seed high 32 bits) and counter (element index // 8, in two 32-bit halves,
  tensor slot, step t): its 128 bits serve 8 elements (``random_bits``), the same on every backend, launch layout and
  CUDA-graph replay. The element index is its position in the tensor's memory, which the kernels walk. 16-bit state
  rounded stochastically (registry.STATE_ROUNDINGS) draws the same way from a stream of its own: state slot j is
  stream 1 + j, the parameter stream 0, in the top 8 bits of the counter's second word.

8-bit state (registry.QUANTIZED; ``quantize`` and ``dequantize``): each state slot keeps one int8 code per element and
one float32 scale per block of registry.QBLOCK elements of the tensor's memory. Codes are linear in a companded value:
sign(x) |x|^1/2 for a signed slot (code -127..127), x^1/4 for a slot that is never negative (Rule.positive; code
0..255, held in the int8's bits). The block's scale ("absmax") is the largest companded magnitude in it. Both maps
decode with products only and encode with square roots, which every backend rounds alike (IEEE), so the codes are the
same bits everywhere. Measured against linear codes and FlashOptim's companders on AdamW's moments
(benchmarks/state_maps.py): linear codes for v round small v to 0, and u = m / sqrt(v) then explodes.

Bits are handled as int64 tensors holding unsigned 32-bit values (torch has no uint32 arithmetic on every device).
"""

from __future__ import annotations

import torch

_U32 = 0xFFFFFFFF


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bits of float32 ``x`` as unsigned 32-bit values (int64)."""
    return x.view(torch.int32).to(torch.int64) & _U32


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _as_bfloat16(hi: torch.Tensor) -> torch.Tensor:
    return torch.where(hi >= 2**15, hi - 2**16, hi).to(torch.int16).view(torch.bfloat16)


def master_join(p: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The float32 master of bfloat16 parameter ``p`` and its int16 remainder ``low``."""
    hi = p.view(torch.int16).to(torch.int64) & 0xFFFF
    return _from_bits(((hi << 16) + low.to(torch.int64)) & _U32)


def master_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``x`` as (bfloat16 parameter, int16 remainder). A NaN stays a NaN (quieted; adding half a unit to its
    bits could carry into the sign)."""
    b = bits(x)
    hi = torch.where(torch.isnan(x), (b >> 16) | 0x40, (b + 0x8000) >> 16)
    low = (b - (hi << 16)) & 0xFFFF
    return _as_bfloat16(hi), torch.where(low >= 2**15, low - 2**16, low).to(torch.int16)


def master8_join(p: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The 24-bit master (a float32) of bfloat16 parameter ``p`` and its int8 correction ``low``."""
    hi = p.view(torch.int16).to(torch.int64) & 0xFFFF
    return _from_bits(((hi << 16) + (low.to(torch.int64) << 8)) & _U32)


def master8_split(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``x`` rounded stochastically to 24 bits by the top 8 of 16 random bits ``r``, as (bfloat16 parameter,
    int8 correction). A NaN stays a NaN (correction 0)."""
    b = (bits(x) + (r >> 8)) & ~0xFF  # magnitude bits: the carry rounds away from zero with probability (dropped) / 2^8
    p, low16 = master_split(_from_bits(b & _U32))
    nan = torch.isnan(x)
    p = torch.where(nan, master_split(x)[0], p)
    return p, torch.where(nan, 0, low16.to(torch.int64) >> 8).to(torch.int8)


def _mulhilo(a: int, b: torch.Tensor | int) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """(high, low) 32 bits of the 64-bit product of unsigned 32-bit a and b, in int64 arithmetic without overflow."""
    x, y = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    mid = x + ((y & 0xFFFF) << 16)
    return (y >> 16) + (mid >> 32), mid & _U32


def philox(c0, c1, c2, c3, k0: int, k1: int) -> tuple:
    """The four output words of Philox 4x32-10 for counter (c0, c1, c2, c3) and key (k0, k1)."""
    for _ in range(10):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
    return c0, c1, c2, c3


def random_bits(like: torch.Tensor, seed: int, slot: int, t: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """Each element's 16 random bits (int64), shaped and laid out as ``like``, for step ``t`` (an int64 0-dim tensor,
    the group's step counter, read on the device). The element at index i of the tensor's memory takes half i % 2
    (low, high) of word i // 2 % 4 of the Philox output for counter (i // 8 low 32 bits, i // 8 >> 32 | stream << 24,
    slot, t): one call serves 8 elements. ``stream`` is 0 for the parameter, 1 + j for its state slot j."""
    n = like.numel()
    block = torch.arange(-(-n // 8), dtype=torch.int64, device=like.device)
    words = torch.stack(philox(block & _U32, (block >> 32) | stream << 24, slot, t.to(like.device) & _U32,
                               seed & _U32, seed >> 32), 1)
    halves = torch.stack([words & 0xFFFF, words >> 16], 2).reshape(-1)[:n]
    out = torch.empty_like(like, dtype=torch.int64)  # dense, laid out as `like`, from offset 0
    out.as_strided((n,), (1,)).copy_(halves)
    return out


def round_stochastic_half(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Float32 ``x`` rounded to float16 by 16 random bits per element ``r``, to the neighbour of larger magnitude with
    probability (distance from the other) / (their spacing). From 2^-14 up (float16's normal range) float16 keeps 10
    of float32's 23 mantissa bits: the top 13 random bits are added to the 13 dropped ones and a carry rounds up,
    exactly as bfloat16's 16 (a magnitude past float16's largest becomes inf). Below 2^-14 the spacing is 2^-24:
    the fraction |x| 2^24 - floor(|x| 2^24), truncated to 16 bits, carried by the 16 random bits (a bias under 2^-16
    of the spacing). A NaN stays a NaN."""
    b = bits(x)
    a = b & 0x7FFFFFFF
    normal = _from_bits((a + (r >> 3)) & ~0x1FFF)
    m = _from_bits(a) * 2.0**24  # exact: a power of two
    n = m.floor()
    frac16 = ((m - n) * 65536.0).floor().to(torch.int64)
    tiny = (n + (r + frac16 >= 65536).float()) * 2.0**-24
    y = torch.where(a >= 0x38800000, normal, tiny)
    y = torch.where(b >= 2**31, -y, y)
    return torch.where(torch.isnan(x), x, y).to(torch.float16)  # exact: y is a float16 value, or past its range


def round_stochastic(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Float32 ``x`` rounded to bfloat16 by 16 random bits per element ``r``: to the neighbour of larger magnitude
    when r + (the 16 bits of x that bfloat16 drops) carries, so with probability (those bits) / 2^16. A NaN stays a
    NaN, as in master_split."""
    b = bits(x)
    return _as_bfloat16(torch.where(torch.isnan(x), (b >> 16) | 0x40, (b + r) >> 16))


def round_stochastic_to(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 ``x`` rounded stochastically by 16 random bits per element ``r`` to ``dtype`` (bfloat16 or float16)."""
    return round_stochastic_half(x, r) if dtype == torch.float16 else round_stochastic(x, r)


# -- 8-bit state ----------------------------------------------------------------------------------------------------
def _levels(positive: bool) -> float:
    return 255.0 if positive else 127.0


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order (the order the kernels walk)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The float32 square root of float32 ``x``, correctly rounded (IEEE's, as the kernels' sqrt.rn): through float64,
    which holds it to far more than the rounding needs. (torch's own float32 sqrt on a CPU is off by one unit in the
    last place now and then: Sleef's, within 0.5001 of one.)"""
    return x.double().sqrt().float()


def _blocked(flat: torch.Tensor, block: int) -> torch.Tensor:
    """[n] as [blocks, block], the last block padded with zeros (which no largest magnitude can exceed)."""
    pad = -flat.numel() % block
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)


def quantize(x: torch.Tensor, positive: bool, r: torch.Tensor | None, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 state ``x`` (dense) as (int8 codes laid out as ``x``, float32 absmax [blocks]): z = |x|^1/2 (signed) or
    x^1/4 (positive: x >= 0), absmax = the block's largest z, y = z (levels / absmax) in float32 (levels 127 or 255;
    a block of zeros: 0); the code is floor(y) + 1 when the fraction y - floor(y) is at least 1/2 (``r`` None: to
    nearest, ties up) or above r 2^-16, r 16 random bits per element (stochastically: unbiased to 2^-16 of a code), at
    most ``levels``; with x's sign for a signed slot."""
    levels = _levels(positive)
    flat = _flat(x)
    z = _sqrt(flat.abs())
    if positive:
        z = _sqrt(z)
    zb = _blocked(z, block)
    absmax = zb.amax(1)
    # tensor by tensor: torch divides a scalar by a tensor (and a CPU tensor by a scalar) through a reciprocal, which
    # rounds twice; the kernels divide once (div.rn)
    inv = torch.where(absmax > 0, torch.full_like(absmax, levels) / absmax, torch.zeros_like(absmax))
    y = (zb * inv[:, None]).reshape(-1)[:flat.numel()]
    fl = y.floor()
    # y's fraction against 1/2 or r 2^-16, as y against fl + that: a sum float32 holds exactly (8 + 16 bits), so no
    # backend's fused multiply-add can round it otherwise
    up = y >= fl + 0.5 if r is None else y > fl + _flat(r).float() * 2.0**-16
    q = torch.clamp(fl + up.float(), max=levels).to(torch.int64)
    if positive:
        q = torch.where(q > 127, q - 256, q)  # 0..255 in the int8's bits
    else:
        q = torch.where(flat < 0, -q, q)
    codes = torch.empty_like(x, dtype=torch.int8)
    _flat(codes).copy_(q)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, positive: bool, block: int) -> torch.Tensor:
    """The float32 state that int8 ``codes`` (dense) and their blocks' ``absmax`` hold, laid out as ``codes``:
    w = |code| (absmax / levels), then w^2 with the code's sign (signed) or (w^2)^2 (positive)."""
    q = _flat(codes).to(torch.int64)
    if positive:
        q = q & 0xFF
    step = (absmax / torch.full_like(absmax, _levels(positive))).repeat_interleave(block)[:q.numel()]
    w = q.abs().float() * step
    w2 = w * w
    x = w2 * w2 if positive else torch.where(q < 0, -w2, w2)
    out = torch.empty_like(codes, dtype=torch.float32)
    _flat(out).copy_(x)
    return out
