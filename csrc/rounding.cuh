// How a 16-bit parameter keeps the precision of its updates (registry.py's CODECS), one element at a time, on
// float32 bits: the exact master of a bfloat16 parameter split into the parameter and 16 low bits, and stochastic
// rounding from counter-based random bits. backends/reference.py (master_join, master_split, philox,
// round_stochastic) and backends/triton.py compute the same bits.
#pragma once

#include <stdint.h>
#include <string.h>

#include "schedules.cuh"

namespace uf {

// The bits of x as a To (std::bit_cast, which nvcc's device side lacks); a register move on both sides.
template <typename To, typename From>
UF_HD To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To y;
  memcpy(&y, &x, sizeof y);
  return y;
}

// The float32 master of a bfloat16 parameter: its bits are the parameter's 16 (the high half) plus the signed
// remainder kept in the optimizer's state, in 32-bit wrap-around arithmetic.
UF_HD float master_join(uint16_t hi, int16_t lo) {
  return bit_cast<float>((static_cast<uint32_t>(hi) << 16) + static_cast<uint32_t>(static_cast<int32_t>(lo)));
}

// hi: the bfloat16 bits nearest x, ties away from zero (adding half a unit to the magnitude's bits), so that the
// remainder x - hi lies in [-2^15, 2^15) units of the low half and fits 16 signed bits. Round-to-nearest-even would
// need one more bit: its remainder reaches +2^15 on a tie rounded down. A NaN stays a NaN (quieted: adding to
// its bits could carry into the sign, or into zero).
UF_HD uint16_t master_high(float x) {
  const uint32_t b = bit_cast<uint32_t>(x);
  return static_cast<uint16_t>(x != x ? (b >> 16) | 0x40u : (b + 0x8000u) >> 16);
}
UF_HD int16_t master_low(float x, uint16_t hi) {
  return static_cast<int16_t>(static_cast<int32_t>(bit_cast<uint32_t>(x) - (static_cast<uint32_t>(hi) << 16)));
}

// The 24-bit master of a bfloat16 parameter with an 8-bit correction (registry.py's "correction"): the parameter's 16
// bits, then the signed correction's 8, then 8 zero bits.
UF_HD float master8_join(uint16_t hi, int8_t lo) {
  return bit_cast<float>((static_cast<uint32_t>(hi) << 16) + (static_cast<uint32_t>(static_cast<int32_t>(lo)) << 8));
}

// x rounded stochastically to 24 bits by the top 8 of 16 random bits r (their carry into the 8 bits dropped rounds the
// magnitude up with probability (those bits) / 2^8), split as master_high / master_low split it: the remainder of a
// 24-bit value is a multiple of 2^8 in [-2^15, 2^15), so its top 8 bits fit an int8. A NaN stays a NaN (correction 0).
UF_HD void master8_split(float x, uint32_t r, uint16_t& hi, int8_t& lo) {
  if (x != x) {
    hi = master_high(x);
    lo = 0;
    return;
  }
  const uint32_t b = (bit_cast<uint32_t>(x) + (r >> 8)) & 0xFFFFFF00u;
  hi = static_cast<uint16_t>((b + 0x8000u) >> 16);
  lo = static_cast<int8_t>(static_cast<int32_t>(b - (static_cast<uint32_t>(hi) << 16)) >> 8);
}

UF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox 4x32 with 10 rounds (Salmon et al., SC'11) on counter c (in place: its output) and key (k0, k1): what
// triton.language.philox computes.
UF_HD void philox(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint32_t a = c[0], b = c[2];
    c[0] = mulhi32(0xCD9E8D57u, b) ^ c[1] ^ k0;
    c[2] = mulhi32(0xD2511F53u, a) ^ c[3] ^ k1;
    c[1] = 0xCD9E8D57u * b;
    c[3] = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// What keys the random bits of one tensor's elements: the seed (k0, k1), the tensor (its position in the optimizer,
// `slot`) and the step (t, the group's step counter); the element's index in its tensor is the rest of the counter.
struct RandomKey {
  uint32_t k0, k1, slot, t;
};

// The 16 random bits of elements 8 * block ... 8 * block + 7 in random stream `stream` (0: the parameter, 1 + j: its
// state slot j): one Philox output (counter: block's low 32 bits, its high ones | stream << 24, slot, t), element
// 8 * block + i taking half i % 2 (low, high) of word i / 2. backends/rounding.py: random_bits.
UF_HD void random_block(const RandomKey& key, int64_t block, uint16_t (&out)[8], uint32_t stream = 0) {
  uint32_t c[4] = {static_cast<uint32_t>(block),
                   static_cast<uint32_t>(static_cast<uint64_t>(block) >> 32) | (stream << 24), key.slot, key.t};
  philox(c, key.k0, key.k1);
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = static_cast<uint16_t>(c[j]);
    out[2 * j + 1] = static_cast<uint16_t>(c[j] >> 16);
  }
}

// x rounded to one of its two neighbouring bfloat16 values by 16 random bits r: to the one of larger magnitude when r
// plus the 16 bits of x that bfloat16 drops carries, so with probability (those bits) / 2^16: unbiased. A NaN stays a
// NaN, as in master_high.
UF_HD uint16_t round_stochastic(float x, uint32_t r) {
  const uint32_t b = bit_cast<uint32_t>(x);
  return static_cast<uint16_t>(x != x ? (b >> 16) | 0x40u : (b + r) >> 16);
}

// x rounded to a float16 value (returned as the float32 that holds it exactly, or past float16's range: the caller's
// conversion makes that inf) by 16 random bits r, to the neighbour of larger magnitude with probability (distance
// from the other) / (their spacing). From 2^-14 up float16 keeps 10 of float32's 23 mantissa bits: the top 13 random
// bits carry the 13 dropped ones, exactly as round_stochastic. Below, the spacing is 2^-24: the fraction of
// |x| 2^24, truncated to 16 bits, carried by all 16 (a bias under 2^-16 of the spacing). A NaN stays a NaN.
// backends/rounding.py: round_stochastic_half.
UF_HD float round_stochastic_half(float x, uint32_t r) {
  if (x != x) return x;
  const uint32_t b = bit_cast<uint32_t>(x), a = b & 0x7FFFFFFFu;
  float y;
  if (a >= 0x38800000u) {
    y = bit_cast<float>((a + (r >> 3)) & ~0x1FFFu);
  } else {
    const float m = bit_cast<float>(a) * 16777216.0f;  // |x| 2^24: exact
    const float n = floorf(m);
    const uint32_t frac16 = static_cast<uint32_t>((m - n) * 65536.0f);  // truncated: floor
    y = (n + (r + frac16 >= 65536u ? 1.0f : 0.0f)) * 5.9604644775390625e-8f;  // 2^-24
  }
  return (b >> 31) ? -y : y;
}

// 8-bit state (registry.QUANTIZED): int8 codes linear in sign(x) |x|^1/2 (a signed slot: -127..127) or x^1/4 (a slot
// that is never negative: 0..255 in the int8's bits), scaled per block by the block's largest companded magnitude,
// `absmax`. backends/rounding.py: quantize and dequantize, bit for bit (IEEE square roots and divisions, as nvcc's
// defaults compile them; no sum follows a product that a fused multiply-add could round otherwise).
UF_HD float companded(float x, bool positive) {
  const float z = sqrtf(fabsf(x));
  return positive ? sqrtf(z) : z;
}

UF_HD float levels(bool positive) { return positive ? 255.0f : 127.0f; }

// What `code` holds, in a block whose largest companded magnitude is `absmax`: w = |code| (absmax / levels), then
// w^2 with the code's sign, or (w^2)^2.
UF_HD float decode8(int8_t code, float absmax, bool positive) {
  const int q = positive ? static_cast<int>(static_cast<uint8_t>(code)) : (code < 0 ? -code : code);
  const float w = static_cast<float>(q) * (absmax / levels(positive));
  const float w2 = w * w;
  return positive ? w2 * w2 : (code < 0 ? -w2 : w2);
}

// levels / absmax, what a block's companded values are multiplied by (0 for a block of zeros).
UF_HD float code_scale(float absmax, bool positive) { return absmax > 0.0f ? levels(positive) / absmax : 0.0f; }

// x's code in a block of scale `inv` (code_scale): y = companded(x) inv, floor(y) + 1 where y's fraction is at least
// 1/2 (r < 0: to nearest) or above r 2^-16 (16 random bits: stochastically), at most levels, with x's sign if signed.
UF_HD int8_t encode8(float x, float inv, bool positive, int32_t r) {
  const float y = companded(x, positive) * inv;
  const float fl = floorf(y);
  const bool up = r < 0 ? y >= fl + 0.5f : y > fl + static_cast<float>(r) * 1.52587890625e-05f;  // exact sums
  int q = static_cast<int>(fminf(fl + (up ? 1.0f : 0.0f), levels(positive)));
  if (!positive && x < 0.0f) q = -q;
  return static_cast<int8_t>(static_cast<uint8_t>(q & 0xFF));
}

}  // namespace uf
