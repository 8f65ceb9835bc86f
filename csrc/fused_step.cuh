// One launch per step over a whole parameter list, from the device tables of backends/plan.py.
// The CUDA twin of backends/triton.py: the same tables, chunks, counters and math (updates.cuh).
// The kernel body is host+device code: run_fused_step_on_host runs it on CPU tables for the tests.
// Included by fused_step_part<P>.cu, each compiling every rule for the storages of part P (UF_STEP_PART), so that
// the kernels compile in kStepParts translation units at once; fused_step.cu dispatches to them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

#include "launch.h"
#include "rounding.cuh"
#include "updates.cuh"

namespace uf {
namespace {

constexpr int kThreads = 256;

// What differs between the device and the host build of the code below (the host build runs the
// same kernel body on CPU tables, one item after another: how CI tests this launcher without a GPU).
// A vector V (uint4: 16 bytes, or uint2: 8) at v * sizeof(V) bytes from base, read and written once per step:
// streaming (evict-first) on the device.
template <typename V>
UF_HD V load_vector(const void* base, int64_t v) {
#ifdef __CUDA_ARCH__
  return __ldcs(static_cast<const V*>(base) + v);
#else
  V r;
  memcpy(&r, static_cast<const char*>(base) + sizeof(V) * v, sizeof r);
  return r;
#endif
}
template <typename V>
UF_HD void store_vector(void* base, int64_t v, const V& x) {
#ifdef __CUDA_ARCH__
  __stcs(static_cast<V*>(base) + v, x);
#else
  memcpy(static_cast<char*>(base) + sizeof(V) * v, &x, sizeof x);
#endif
}
UF_HD int fetch_add(int* p, int v) {
#ifdef __CUDA_ARCH__
  return atomicAdd(p, v);
#else
  const int old = *p;
  *p = old + v;
  return old;
#endif
}
UF_HD void fence() {
#ifdef __CUDA_ARCH__
  __threadfence();
#endif
}

template <typename T> UF_HD float to_float(T x);
template <> UF_HD float to_float<float>(float x) { return x; }
template <> UF_HD float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> UF_HD float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> UF_HD T from_float(float x);
template <> UF_HD float from_float<float>(float x) { return x; }
template <> UF_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> UF_HD __half from_float<__half>(float x) { return __float2half_rn(x); }

// 16 bytes hold kVec<T> elements; they travel as one uint4.
template <typename T> constexpr int kVec = 16 / sizeof(T);

UF_HD float bits_to_float(unsigned bits, float*) { return bit_cast<float>(bits); }
UF_HD float bits_to_float(unsigned short bits, __nv_bfloat16*) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
UF_HD float bits_to_float(unsigned short bits, __half*) { return __half2float(__ushort_as_half(bits)); }
UF_HD unsigned float_to_bits(float x, float*) { return bit_cast<unsigned>(x); }
UF_HD unsigned short float_to_bits(float x, __nv_bfloat16*) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
UF_HD unsigned short float_to_bits(float x, __half*) { return __half_as_ushort(__float2half_rn(x)); }

template <typename T>
UF_HD void unpack(const uint4& raw, float (&out)[kVec<T>]) {
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < kVec<T>; ++j) {
    if constexpr (sizeof(T) == 4) {
      out[j] = bits_to_float(w[j], static_cast<T*>(nullptr));
    } else {
      out[j] = bits_to_float(static_cast<unsigned short>(w[j / 2] >> (16 * (j % 2))), static_cast<T*>(nullptr));
    }
  }
}

template <typename T>
UF_HD uint4 pack(const float (&in)[kVec<T>]) {
  unsigned w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      w[i] = float_to_bits(in[i], static_cast<T*>(nullptr));
    } else {
      w[i] = static_cast<unsigned>(float_to_bits(in[2 * i], static_cast<T*>(nullptr))) |
             (static_cast<unsigned>(float_to_bits(in[2 * i + 1], static_cast<T*>(nullptr))) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The load/store policy of one storage dtype: N elements (a multiple of kVec<T>, so whole 16-byte vectors) at
// index v in units of N, or one element at index i, converted to and from float32 (round to nearest).
// Parameters, gradients and every state slot go through it, each slot in its own dtype (StateIo rounds bfloat16
// state stochastically first in the storages that say so).
template <typename T>
struct Io {
  static constexpr int V = kVec<T>;
  template <int N>
  static UF_HD void load(const T* base, int64_t v, float (&out)[N]) {
    static_assert(N % V == 0, "whole 16-byte vectors");
#pragma unroll
    for (int q = 0; q < N / V; ++q) {
      float part[V];
      unpack<T>(load_vector<uint4>(base, v * (N / V) + q), part);
#pragma unroll
      for (int j = 0; j < V; ++j) out[q * V + j] = part[j];
    }
  }
  template <int N>
  static UF_HD void store(T* base, int64_t v, const float (&in)[N]) {
    static_assert(N % V == 0, "whole 16-byte vectors");
#pragma unroll
    for (int q = 0; q < N / V; ++q) {
      float part[V];
#pragma unroll
      for (int j = 0; j < V; ++j) part[j] = in[q * V + j];
      store_vector(base, v * (N / V) + q, pack<T>(part));
    }
  }
  static UF_HD float load(const T* base, int64_t i) { return to_float(base[i]); }
  static UF_HD void store(T* base, int64_t i, float x) { base[i] = from_float<T>(x); }
};

// 16-bit words: N of them (whole 16-byte vectors) at index v in units of N, as raw bits.
template <int N>
UF_HD void load_words(const void* base, int64_t v, uint16_t (&out)[N]) {
  static_assert(N % 8 == 0, "whole 16-byte vectors");
#pragma unroll
  for (int q = 0; q < N / 8; ++q) {
    const uint4 raw = load_vector<uint4>(base, v * (N / 8) + q);
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) out[q * 8 + j] = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
  }
}
template <int N>
UF_HD void store_words(void* base, int64_t v, const uint16_t (&in)[N]) {
  static_assert(N % 8 == 0, "whole 16-byte vectors");
#pragma unroll
  for (int q = 0; q < N / 8; ++q) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = in[q * 8 + 2 * i] | (static_cast<unsigned>(in[q * 8 + 2 * i + 1]) << 16);
    store_vector(base, v * (N / 8) + q, make_uint4(w[0], w[1], w[2], w[3]));
  }
}

// 8-bit values: N of them (whole 8-byte units) at index v in units of N, as raw bytes.
template <int N>
UF_HD void load_bytes(const void* base, int64_t v, int8_t (&out)[N]) {
  static_assert(N % 8 == 0, "whole 8-byte units");
#pragma unroll
  for (int q = 0; q < N / 8; ++q) {
    const uint2 raw = load_vector<uint2>(base, v * (N / 8) + q);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[q * 8 + j] = static_cast<int8_t>((j < 4 ? raw.x : raw.y) >> (8 * (j % 4)));
  }
}
template <int N>
UF_HD void store_bytes(void* base, int64_t v, const int8_t (&in)[N]) {
  static_assert(N % 8 == 0, "whole 8-byte units");
#pragma unroll
  for (int q = 0; q < N / 8; ++q) {
    unsigned w[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j / 4] |= static_cast<unsigned>(static_cast<uint8_t>(in[q * 8 + j])) << (8 * (j % 4));
    store_vector(base, v * (N / 8) + q, make_uint2(w[0], w[1]));
  }
}

// How a parameter of dtype T is read into float32 before its update and written back after it: registry.py's
// CODECS (the math of each is in rounding.cuh). M is the element type of its master slot (the state "master"),
// which only kRemainder and kCopy keep; `m` points at scratch for the others and is never read. As Io: N
// elements at index v in units of N, or element i.
template <typename T, int C>
struct ParamIo {  // kNearest: the parameter as it is, rounded to nearest
  using M = float;
  template <int N>
  static UF_HD void load(const T* p, const M*, int64_t v, float (&out)[N]) { Io<T>::load(p, v, out); }
  template <int N>
  static UF_HD void store(T* p, M*, int64_t v, const float (&in)[N], const RandomKey&) { Io<T>::store(p, v, in); }
  static UF_HD float load(const T* p, const M*, int64_t i) { return Io<T>::load(p, i); }
  static UF_HD void store(T* p, M*, int64_t i, float x, const RandomKey&) { Io<T>::store(p, i, x); }
};

template <>
struct ParamIo<__nv_bfloat16, kRemainder> {  // the float32 master: the parameter's bits and 16 low bits
  using T = __nv_bfloat16;
  using M = int16_t;
  template <int N>
  static UF_HD void load(const T* p, const M* m, int64_t v, float (&out)[N]) {
    uint16_t hi[N], lo[N];
    load_words(p, v, hi);
    load_words(m, v, lo);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = master_join(hi[e], static_cast<int16_t>(lo[e]));
  }
  template <int N>
  static UF_HD void store(T* p, M* m, int64_t v, const float (&in)[N], const RandomKey&) {
    uint16_t hi[N], lo[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      hi[e] = master_high(in[e]);
      lo[e] = static_cast<uint16_t>(master_low(in[e], hi[e]));
    }
    store_words(p, v, hi);
    store_words(m, v, lo);
  }
  static UF_HD float load(const T* p, const M* m, int64_t i) {
    return master_join(reinterpret_cast<const uint16_t*>(p)[i], m[i]);
  }
  static UF_HD void store(T* p, M* m, int64_t i, float x, const RandomKey&) {
    const uint16_t hi = master_high(x);
    reinterpret_cast<uint16_t*>(p)[i] = hi;
    m[i] = master_low(x, hi);
  }
};

template <>
struct ParamIo<__half, kCopy> {  // a float32 copy; the parameter is its rounding to nearest
  using T = __half;
  using M = float;
  // The master, unless the parameter is no longer its rounding (someone else wrote the parameter: a model state
  // dict loaded, weights swapped): then the parameter, so that the optimizer never undoes such a write.
  static UF_HD float pick(float master, float param) {
    return to_float(from_float<__half>(master)) == param ? master : param;
  }
  template <int N>
  static UF_HD void load(const T* p, const M* m, int64_t v, float (&out)[N]) {
    float ph[N];
    Io<T>::load(p, v, ph);
    Io<float>::load(m, v, out);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = pick(out[e], ph[e]);
  }
  template <int N>
  static UF_HD void store(T* p, M* m, int64_t v, const float (&in)[N], const RandomKey&) {
    Io<float>::store(m, v, in);
    Io<T>::store(p, v, in);
  }
  static UF_HD float load(const T* p, const M* m, int64_t i) { return pick(m[i], Io<T>::load(p, i)); }
  static UF_HD void store(T* p, M* m, int64_t i, float x, const RandomKey&) {
    m[i] = x;
    Io<T>::store(p, i, x);
  }
};

template <>
struct ParamIo<__nv_bfloat16, kCorrection> {  // the 24-bit master: the parameter's bits and 8 more
  using T = __nv_bfloat16;
  using M = int8_t;
  template <int N>
  static UF_HD void load(const T* p, const M* m, int64_t v, float (&out)[N]) {
    uint16_t hi[N];
    int8_t lo[N];
    load_words(p, v, hi);
    load_bytes(m, v, lo);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = master8_join(hi[e], lo[e]);
  }
  template <int N>
  static UF_HD void store(T* p, M* m, int64_t v, const float (&in)[N], const RandomKey& key) {
    static_assert(N % 8 == 0, "whole blocks of random bits");
    uint16_t hi[N];
    int8_t lo[N];
#pragma unroll
    for (int q = 0; q < N / 8; ++q) {
      uint16_t r[8];
      random_block(key, v * (N / 8) + q, r);
#pragma unroll
      for (int e = 0; e < 8; ++e) master8_split(in[8 * q + e], r[e], hi[8 * q + e], lo[8 * q + e]);
    }
    store_words(p, v, hi);
    store_bytes(m, v, lo);
  }
  static UF_HD float load(const T* p, const M* m, int64_t i) {
    return master8_join(reinterpret_cast<const uint16_t*>(p)[i], m[i]);
  }
  static UF_HD void store(T* p, M* m, int64_t i, float x, const RandomKey& key) {  // a tail or misaligned: per element
    uint16_t r[8];
    random_block(key, i >> 3, r);
    master8_split(x, r[i & 7], reinterpret_cast<uint16_t*>(p)[i], m[i]);
  }
};

// x rounded stochastically to a value of T, by 16 random bits r (rounding.cuh), as the float32 that holds it exactly:
// Io<T>'s rounding to nearest then stores it as it is.
UF_HD float stochastic(float x, uint32_t r, __nv_bfloat16*) {
  return bits_to_float(round_stochastic(x, r), static_cast<__nv_bfloat16*>(nullptr));
}
UF_HD float stochastic(float x, uint32_t r, __half*) { return round_stochastic_half(x, r); }

template <typename T>
struct ParamIo<T, kStochastic> {  // rounded stochastically, element i from its own random bits
  using M = float;
  template <int N>
  static UF_HD void load(const T* p, const M*, int64_t v, float (&out)[N]) { Io<T>::load(p, v, out); }
  template <int N>
  static UF_HD void store(T* p, M*, int64_t v, const float (&in)[N], const RandomKey& key) {
    static_assert(N % 8 == 0, "whole blocks of random bits");
    float out[N];
#pragma unroll
    for (int q = 0; q < N / 8; ++q) {
      uint16_t r[8];
      random_block(key, v * (N / 8) + q, r);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[8 * q + e] = stochastic(in[8 * q + e], r[e], static_cast<T*>(nullptr));
    }
    Io<T>::store(p, v, out);
  }
  static UF_HD float load(const T* p, const M*, int64_t i) { return Io<T>::load(p, i); }
  static UF_HD void store(T* p, M*, int64_t i, float x, const RandomKey& key) {  // a tail or misaligned: per element
    uint16_t r[8];
    random_block(key, i >> 3, r);
    Io<T>::store(p, i, stochastic(x, r[i & 7], static_cast<T*>(nullptr)));
  }
};

// How a state slot of dtype TS is written back: rounded to nearest (Io), or, with SR (a storage whose bfloat16 state
// is rounded stochastically), stochastically from random stream 1 + j for slot j (rounding.cuh). A template
// argument, not a runtime flag: a branch on it took every kernel with 16-bit state to the registers of both (bf16
// AdamW with a remainder: 64 to 117).
template <typename TS, bool SR>
struct StateIo {
  template <int N>
  static UF_HD void store(TS* s, int64_t v, float (&in)[N], const RandomKey& key, uint32_t stream) {
    if constexpr (SR) {
      static_assert(sizeof(TS) == 2 && N % 8 == 0, "16-bit state, whole blocks of random bits");
#pragma unroll
      for (int q = 0; q < N / 8; ++q) {
        uint16_t r[8];
        random_block(key, v * (N / 8) + q, r, stream);
#pragma unroll
        for (int e = 0; e < 8; ++e) in[8 * q + e] = stochastic(in[8 * q + e], r[e], static_cast<TS*>(nullptr));
      }
    }
    Io<TS>::store(s, v, in);
  }
  static UF_HD void store(TS* s, int64_t i, float x, const RandomKey& key, uint32_t stream) {
    if constexpr (SR) {
      uint16_t r[8];
      random_block(key, i >> 3, r, stream);
      x = stochastic(x, r[i & 7], static_cast<TS*>(nullptr));
    }
    Io<TS>::store(s, i, x);
  }
};

// One work item (one block on the device): a chunk of one tensor, with what its update needs. T is the
// parameter's (and its gradient's) storage dtype, TS its state's, C the parameter's codec.
template <typename T, typename TS, int C, bool SR, class R>
struct Item {
  static constexpr int S = R::Cols::kStates;
  using P = ParamIo<T, C>;
  T* p;
  typename P::M* m;  // the master slot (kRemainder, kCopy, kCorrection)
  RandomKey key;     // the random bits' (kStochastic, kCorrection, SR)
  const T* g;
  TS* s[S];
  float* absmax;     // 8-bit state's block scales: [S, n_blocks] (TS int8_t)
  int64_t n_blocks;
  float* step;
  float* scalar;     // its per-tensor state (Rule.scalar; a rule that measures, kMeasures), else nullptr
  int64_t slot, start, end, n_chunks;
  bool vector;       // a full chunk, every tensor 16-byte aligned: 128-bit accesses, no bounds checks
  bool writes_step;  // a real tensor (not the sentinel) with a gradient this step
  bool has_state;    // the group keeps state (SGD without momentum keeps none)
  float k;           // this tensor's step count after this update
  float gscale;      // what each gradient is multiplied by: 1 / GradScaler's scale, times the group's clipping factor
  typename R::Scalars c;
  const float* coefs;  // a rule that projects (kProjects): the coefficients (Rows.coefs) from the row of `start`,
  int32_t row_rem;     // which is its row's row_rem-th element, rows of row_len elements (int32: an element's row
  int32_t row_len;     // is an int32 division)
};

template <typename T, typename TS, int C, bool SR, class R>
UF_HD Item<T, TS, C, SR, R> open_item(const FusedStepArgs& args, int64_t item) {
  Item<T, TS, C, SR, R> it;
  it.slot = args.work[2 * item];
  it.start = args.work[2 * item + 1];
  const int64_t* row = args.tensors + it.slot * (kState0 + R::Cols::kStates);
  const int64_t grad = args.grads[row[kGradSlot]];
  it.p = reinterpret_cast<T*>(row[kParam]);
  it.g = reinterpret_cast<const T*>(grad);
  it.m = reinterpret_cast<typename Item<T, TS, C, SR, R>::P::M*>(row[kMaster]);
  for (int j = 0; j < Item<T, TS, C, SR, R>::S; ++j) it.s[j] = reinterpret_cast<TS*>(row[kState0 + j]);
  it.step = reinterpret_cast<float*>(row[kStep]);
  it.scalar = R::Cols::kMeasures != 0 ? reinterpret_cast<float*>(row[kScalar]) : nullptr;
  it.absmax = reinterpret_cast<float*>(row[kAbsmax]);
  it.n_blocks = (row[kNumel] + kQBlock - 1) / kQBlock;
  // A tensor without a gradient this step keeps its row, skipped; so is every tensor when GradScaler found an inf.
  const bool live = grad != kNoGrad && *args.found_inf == 0.0f;
  const int64_t numel = live ? row[kNumel] : 0, info = row[kInfo];
  it.end = numel - it.start < kChunk ? numel : it.start + kChunk;
  it.n_chunks = info >> 1;
  it.writes_step = live && it.slot < args.n_rows - 1;  // the last row is the sentinel
  it.vector = (info & 1) && grad % 16 == 0 && it.end - it.start == kChunk;  // the gradient moves: checked here
  it.coefs = nullptr;
  it.row_rem = 0;
  it.row_len = 1;
  const double* grow = args.groups + row[kGroup] * R::Cols::kCols;
  const int64_t* gaddr = args.gaddr + kGroupAddresses * row[kGroup];
  const int64_t* counter = reinterpret_cast<const int64_t*>(gaddr[kCounterAddress]);
  it.k = *it.step + 1.0f;
  it.has_state = grow[kHasState] != 0.0;
  it.gscale = grad_scale(grow, args.norm, *args.grad_scale);
  const float lr = group_lr(grow, *counter, reinterpret_cast<const float*>(gaddr[kTableAddress]));
  if constexpr (R::Cols::kReduces > 0) {  // the tensor's per-tensor sums (the pre-pass's, summed over shards; none
                                          // in LAMB's direction pre-pass), or a rule that projects its Rows.meta
    const double* red = args.reduced ? args.reduced + R::Cols::kReduces * it.slot : nullptr;
    if constexpr (R::Cols::kMeasures != 0) {  // and the per-tensor state it keeps
      it.c = R::scalars(grow, lr, it.k, red, it.gscale, *it.scalar);
    } else {
      it.c = R::scalars(grow, lr, it.k, red, it.gscale);
    }
    if constexpr (R::Cols::kProjects != 0) {  // as triton.py's _step_kernel
      const int64_t row_len = static_cast<int64_t>(red[0]) > 1 ? static_cast<int64_t>(red[0]) : 1;  // (0: no row)
      const int64_t first_row = it.start / row_len;
      it.coefs = args.coefs + static_cast<int64_t>(red[1]) + first_row;
      if (args.squares != nullptr) {  // the direction pre-pass walks Rows.work: this item's row ends its elements
        const int64_t row_end = (first_row + 1) * row_len;
        it.end = it.end < row_end ? it.end : row_end;
        it.vector = it.vector && it.end - it.start == kChunk && it.start % 8 == 0;  // (whole vectors)
      }
      // a row of 2^31 elements or more is a 1-dim tensor's, one row (backends/plan.py: check_rows refuses others)
      const bool one_row = row_len >= (int64_t{1} << 31) - 2 * kChunk;
      it.row_rem = one_row ? 0 : static_cast<int32_t>(it.start - first_row * row_len);
      it.row_len = one_row ? INT32_MAX : static_cast<int32_t>(row_len);
    }
  } else {
    it.c = R::scalars(grow, lr, it.k);
  }
  const uint64_t seed = static_cast<uint64_t>(grow[kSeed]);
  it.key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(row[kGradSlot]),
            static_cast<uint32_t>(*counter)};
  return it;
}

// R's update of element i of an item: with its row's coefficient, for a rule that projects (kProjects).
template <class R, class I>
UF_HD void apply(const I& it, int64_t i, float& p, float g, float (&s)[R::Cols::kStates]) {
  if constexpr (R::Cols::kProjects != 0) {
    R::update(p, g, s, it.c, it.coefs[(it.row_rem + static_cast<int32_t>(i - it.start)) / it.row_len]);
  } else {
    R::update(p, g, s, it.c);
  }
}

// 8-bit state (TS int8_t): a block of kQBlock elements is a warp's, each lane holding kPerLane of its elements: on the
// vector path lane l's are first + 8 l ... + 7 (one 8-byte vector of codes), elsewhere first + l + 32 k, k < 8. A
// lane loads, decodes and updates its elements (load_lane), the block's largest companded magnitude per slot is
// reduced over its lanes (a warp's shuffles on the device; on the host, the block's 32 lanes one after another, all
// loaded before any is stored), then each lane stores its parameters and codes, and lane 0 the block's scales.
constexpr int kBlockLanes = 32;
constexpr int kPerLane = kQBlock / kBlockLanes;
static_assert(kPerLane == 8 && kChunk % kQBlock == 0, "a lane's elements are one 8-byte vector of codes");

template <class I>
struct Lane {  // one lane's elements of a block: their values after the update, and which exist
  float p[kPerLane], s[I::S][kPerLane];
  bool live[kPerLane];
};

template <class R, class I>
UF_HD void load_lane(const I& it, int64_t first, int l, Lane<I>& x) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(it.g)>>;
  constexpr int S = I::S;
  float g[kPerLane];
  if (it.vector) {
    const int64_t v = first / kPerLane + l;  // in units of 8 elements
    I::P::load(it.p, it.m, v, x.p);
    Io<T>::load(it.g, v, g);
    for (int j = 0; j < S; ++j) {
      int8_t codes[kPerLane];
      load_bytes(it.s[j], v, codes);
      const float absmax = it.absmax[j * it.n_blocks + first / kQBlock];
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) x.s[j][e] = decode8(codes[e], absmax, (R::Cols::kPositive >> j) & 1);
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) x.live[e] = true;
  } else {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t i = first + l + kBlockLanes * e;
      x.live[e] = i < it.end;
      x.p[e] = g[e] = 0.0f;
      for (int j = 0; j < S; ++j) x.s[j][e] = 0.0f;
      if (!x.live[e]) continue;
      x.p[e] = I::P::load(it.p, it.m, i);
      g[e] = Io<T>::load(it.g, i);
      for (int j = 0; j < S; ++j) {
        x.s[j][e] = decode8(it.s[j][i], it.absmax[j * it.n_blocks + first / kQBlock], (R::Cols::kPositive >> j) & 1);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    float st[S];
    for (int j = 0; j < S; ++j) st[j] = x.s[j][e];
    apply<R>(it, it.vector ? first + kPerLane * l + e : first + l + kBlockLanes * e, x.p[e], g[e] * it.gscale, st);
    for (int j = 0; j < S; ++j) x.s[j][e] = st[j];
  }
}

// The largest companded magnitude of slot j among a lane's live elements.
template <class R, class I>
UF_HD float lane_absmax(const Lane<I>& x, int j) {
  float m = 0.0f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    if (x.live[e]) m = fmaxf(m, companded(x.s[j][e], (R::Cols::kPositive >> j) & 1));
  }
  return m;
}

template <class R, bool SR, class I>
UF_HD void store_lane(const I& it, int64_t first, int l, Lane<I>& x, const float (&absmax)[I::S]) {
  constexpr int S = I::S;
  if (it.vector) {
    const int64_t v = first / kPerLane + l;
    I::P::store(it.p, it.m, v, x.p, it.key);
    for (int j = 0; j < S; ++j) {
      const bool positive = (R::Cols::kPositive >> j) & 1;
      const float inv = code_scale(absmax[j], positive);
      uint16_t r[8] = {};
      if (SR) random_block(it.key, v, r, 1 + j);
      int8_t codes[kPerLane];
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        codes[e] = encode8(x.s[j][e], inv, positive, SR ? static_cast<int32_t>(r[e]) : -1);
      }
      store_bytes(it.s[j], v, codes);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      if (!x.live[e]) continue;
      const int64_t i = first + l + kBlockLanes * e;
      I::P::store(it.p, it.m, i, x.p[e], it.key);
      for (int j = 0; j < S; ++j) {
        const bool positive = (R::Cols::kPositive >> j) & 1;
        int32_t r = -1;
        if (SR) {
          uint16_t bits[8];
          random_block(it.key, i >> 3, bits, 1 + j);
          r = bits[i & 7];
        }
        it.s[j][i] = encode8(x.s[j][e], code_scale(absmax[j], positive), positive, r);
      }
    }
  }
  if (l == 0) {
    for (int j = 0; j < S; ++j) it.absmax[j * it.n_blocks + first / kQBlock] = absmax[j];
  }
}

template <class R, bool SR, class I, int LANES>
UF_HD void update_quantized(const I& it, int lane) {
  constexpr int S = I::S;
  if (!it.has_state) return;  // (a storage with 8-bit state keeps state)
  if constexpr (LANES == 1) {  // the host: each block's 32 lanes one after another
    for (int64_t first = it.start; first < it.end; first += kQBlock) {
      Lane<I> x[kBlockLanes];
      float absmax[S] = {};
      for (int l = 0; l < kBlockLanes; ++l) {
        load_lane<R>(it, first, l, x[l]);
        for (int j = 0; j < S; ++j) absmax[j] = fmaxf(absmax[j], lane_absmax<R>(x[l], j));
      }
      for (int l = 0; l < kBlockLanes; ++l) store_lane<R, SR>(it, first, l, x[l], absmax);
    }
  } else {
#ifdef __CUDA_ARCH__
    static_assert(LANES % kBlockLanes == 0, "whole warps");
    const int l = lane % kBlockLanes;
    // every lane of a warp runs the same blocks: the shuffles see all 32
    for (int64_t first = it.start + (lane / kBlockLanes) * kQBlock; first < it.end;
         first += (LANES / kBlockLanes) * kQBlock) {
      Lane<I> x;
      load_lane<R>(it, first, l, x);
      float absmax[S];
      for (int j = 0; j < S; ++j) {
        float m = lane_absmax<R>(x, j);
#pragma unroll
        for (int d = kBlockLanes / 2; d > 0; d /= 2) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
        absmax[j] = m;
      }
      store_lane<R, SR>(it, first, l, x, absmax);
    }
#endif
  }
}

// The elements of an item that lane `lane` of LANES takes: every LANES-th vector (of the narrower of the parameter's
// and the state's dtypes; the wider takes as many vectors as it needs for those elements) or element.
template <typename T, typename TS, int C, bool SR, class R, int LANES>
UF_HD void update_elements(const Item<T, TS, C, SR, R>& it, int lane) {
  using I = Item<T, TS, C, SR, R>;
  constexpr int S = I::S;
  if constexpr (std::is_same_v<TS, int8_t>) {
    update_quantized<R, SR, I, LANES>(it, lane);
  } else if (it.vector) {
    constexpr int N = kVec<T> > kVec<TS> ? kVec<T> : kVec<TS>;
    const int64_t v0 = it.start / N;
#pragma unroll
    for (int i = lane; i < kChunk / N; i += LANES) {
      const int64_t v = v0 + i;
      float pf[N], gf[N], sf[S][N] = {};
      I::P::load(it.p, it.m, v, pf);
      Io<T>::load(it.g, v, gf);
#pragma unroll
      for (int e = 0; e < N; ++e) gf[e] *= it.gscale;
      if (it.has_state) {
        for (int j = 0; j < S; ++j) Io<TS>::load(it.s[j], v, sf[j]);
      }
#pragma unroll
      for (int e = 0; e < N; ++e) {
        float s[S];
        for (int j = 0; j < S; ++j) s[j] = sf[j][e];
        apply<R>(it, v * N + e, pf[e], gf[e], s);
        for (int j = 0; j < S; ++j) sf[j][e] = s[j];
      }
      I::P::store(it.p, it.m, v, pf, it.key);
      if (it.has_state) {
        for (int j = 0; j < S; ++j) StateIo<TS, SR>::store(it.s[j], v, sf[j], it.key, 1 + j);
      }
    }
  } else {
    for (int64_t i = it.start + lane; i < it.end; i += LANES) {
      float p = I::P::load(it.p, it.m, i), s[S] = {};
      if (it.has_state) {
        for (int j = 0; j < S; ++j) s[j] = Io<TS>::load(it.s[j], i);
      }
      apply<R>(it, i, p, Io<T>::load(it.g, i) * it.gscale, s);
      I::P::store(it.p, it.m, i, p, it.key);
      if (it.has_state) {
        for (int j = 0; j < S; ++j) StateIo<TS, SR>::store(it.s[j], i, s[j], it.key, 1 + j);
      }
    }
  }
}

// Counters, as in triton.py, once per item after all its lanes updated their elements (and so read
// this step's counters): the last chunk of a tensor writes its step (and a rule's per-tensor state, kMeasures); the
// last tensor advances every group and writes the lr it applied.
template <class R, class I>
UF_HD void finish_item(const FusedStepArgs& args, const I& it) {
  fence();
  if (fetch_add(args.done + it.slot, 1) != it.n_chunks - 1) return;
  args.done[it.slot] = 0;
  if (it.writes_step) {
    *it.step = it.k;
    if constexpr (R::Cols::kMeasures != 0) *it.scalar = it.c.gsnr;
  }
  fence();
  if (fetch_add(args.done + args.n_rows, 1) != args.n_rows - 1) return;
  args.done[args.n_rows] = 0;
  fence();
  if (!args.advance) return;
  for (int gi = 0; gi < args.n_groups; ++gi) {
    const int64_t* gaddr = args.gaddr + kGroupAddresses * gi;
    int64_t* c = reinterpret_cast<int64_t*>(gaddr[kCounterAddress]);
    float* lr_out = reinterpret_cast<float*>(gaddr[kLrOutAddress]);
    *lr_out = group_lr(args.groups + gi * R::Cols::kCols, *c, reinterpret_cast<const float*>(gaddr[kTableAddress]));
    *c += 1;
  }
}

template <typename T, typename TS, int C, bool SR, class R>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(FusedStepArgs args) {
  const Item<T, TS, C, SR, R> it = open_item<T, TS, C, SR, R>(args, blockIdx.x);
  update_elements<T, TS, C, SR, R, kThreads>(it, threadIdx.x);
  __syncthreads();  // every thread's reads of this step's counters precede the release
  if (threadIdx.x == 0) finish_item<R>(args, it);
}

template <typename T, typename TS, int C, bool SR, class R>
void run_on_host(const FusedStepArgs& args) {
  for (int64_t item = 0; item < args.n_items; ++item) {
    const Item<T, TS, C, SR, R> it = open_item<T, TS, C, SR, R>(args, item);
    update_elements<T, TS, C, SR, R, 1>(it, 0);
    finish_item<R>(args, it);
  }
}

// The pre-pass: lane `lane` of LANES's share of the sum of squares of work item `item`'s chunk of a gradient (of the
// parameter as stored with args.of_param, the per-tensor pre-pass of a rule with kReduces; 0 without a gradient), in
// float64: a square of a float32 above 1.8e19 overflows float32, never float64, so every finite gradient gives a
// finite norm, as backend "torch" (whose norms are float64) gives it. On an H100 float64 arithmetic runs at half
// the float32 rate, far above what reading the gradient once needs.
template <typename T, class R, int LANES>
UF_HD double chunk_sumsq(const FusedStepArgs& args, int64_t item, int lane) {
  const int64_t slot = args.work[2 * item], start = args.work[2 * item + 1];
  const int64_t* row = args.tensors + slot * (kState0 + R::Cols::kStates);
  if (args.grads[row[kGradSlot]] == kNoGrad) return 0.0;
  const int64_t grad = args.of_param ? row[kParam] : args.grads[row[kGradSlot]];
  const int64_t end = row[kNumel] - start < kChunk ? row[kNumel] : start + kChunk;
  const T* g = reinterpret_cast<const T*>(grad);
  double acc = 0.0;
  if (grad % 16 == 0 && end - start == kChunk) {  // a full aligned chunk: 16-byte loads, as the update's
    constexpr int N = kVec<T>;
    for (int i = lane; i < kChunk / N; i += LANES) {
      float x[N];
      Io<T>::load(g, start / N + i, x);
#pragma unroll
      for (int e = 0; e < N; ++e) acc += static_cast<double>(x[e]) * x[e];
    }
  } else {
    for (int64_t i = start + lane; i < end; i += LANES) {
      const double x = to_float(g[i]);
      acc += x * x;
    }
  }
  return acc;
}

// Whether rule R computes its update's direction apart (R::direction): the rules whose pre-pass reduces it.
template <class R, class = void>
struct HasDirection : std::false_type {};
template <class R>
struct HasDirection<R, std::void_t<decltype(&R::direction)>> : std::true_type {};

// Element i of state slot j of an item, as the update reads it (8-bit: decoded with its block's scale).
template <class R, class I>
UF_HD float load_state(const I& it, int j, int64_t i) {
  using TS = std::remove_pointer_t<std::remove_reference_t<decltype(it.s[0])>>;
  if constexpr (std::is_same_v<TS, int8_t>) {
    return decode8(it.s[j][i], it.absmax[j * it.n_blocks + i / kQBlock], (R::Cols::kPositive >> j) & 1);
  } else {
    return Io<TS>::load(it.s[j], i);
  }
}

// Rule R's direction pre-pass sums of one element into acc: p^2 and r^2 (LAMB), or p^2, g^2, p g and p d for a rule
// that projects (registry.PROJECTION).
template <class R>
UF_HD void add_direction(float p, float g, float (&s)[R::Cols::kStates], const typename R::Scalars& c,
                         double (&acc)[R::Cols::kReduces]) {
  const double r = R::direction(p, g, s, c), pd = p;
  acc[0] += pd * p;
  if constexpr (R::Cols::kProjects != 0) {
    acc[1] += static_cast<double>(g) * g;
    acc[2] += pd * g;
    acc[3] += pd * r;
  } else {
    acc[1] += r * r;
  }
}

// The direction pre-pass (launch.h): lane `lane` of LANES's sums (add_direction) over its elements of an item, from
// the loads of update_elements (per element for 8-bit state), storing nothing.
template <typename T, typename TS, int C, bool SR, class R, int LANES>
UF_HD void direction_sumsq(const Item<T, TS, C, SR, R>& it, int lane, double (&acc)[R::Cols::kReduces]) {
  using I = Item<T, TS, C, SR, R>;
  constexpr int S = I::S;
  if constexpr (!std::is_same_v<TS, int8_t>) {
    if (it.vector) {
      constexpr int N = kVec<T> > kVec<TS> ? kVec<T> : kVec<TS>;
      const int64_t v0 = it.start / N;
#pragma unroll
      for (int i = lane; i < kChunk / N; i += LANES) {
        float pf[N], gf[N], sf[S][N];
        I::P::load(it.p, it.m, v0 + i, pf);
        Io<T>::load(it.g, v0 + i, gf);
        for (int j = 0; j < S; ++j) Io<TS>::load(it.s[j], v0 + i, sf[j]);
#pragma unroll
        for (int e = 0; e < N; ++e) {
          float s[S];
          for (int j = 0; j < S; ++j) s[j] = sf[j][e];
          add_direction<R>(pf[e], gf[e] * it.gscale, s, it.c, acc);
        }
      }
      return;
    }
  }
  for (int64_t i = it.start + lane; i < it.end; i += LANES) {
    float s[S];
    for (int j = 0; j < S; ++j) s[j] = load_state<R>(it, j, i);
    add_direction<R>(I::P::load(it.p, it.m, i), Io<T>::load(it.g, i) * it.gscale, s, it.c, acc);
  }
}

// sums[0] = the sum of sums[0..kThreads), added as a fixed tree: the same result every run, on either side.
// On the device each thread adds its pair (`lane`), with a barrier between levels; on the host one call adds all.
template <bool kDevice>
UF_HD void tree_sum(double* sums, int lane) {
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (kDevice) {
      if (lane < half) sums[lane] += sums[lane + half];
#ifdef __CUDA_ARCH__
      __syncthreads();
#endif
    } else {
      for (int i = 0; i < half; ++i) sums[i] += sums[i + half];
    }
  }
}

template <typename T, class R>
__global__ void __launch_bounds__(kThreads) grad_sumsq_kernel(FusedStepArgs args, double* out) {
  __shared__ double sums[kThreads];
  sums[threadIdx.x] = chunk_sumsq<T, R, kThreads>(args, blockIdx.x, threadIdx.x);
  __syncthreads();
  tree_sum<true>(sums, threadIdx.x);
  if (threadIdx.x == 0) out[blockIdx.x] = sums[0];
}

template <typename T, typename TS, int C, bool SR, class R>
__global__ void __launch_bounds__(kThreads) direction_sumsq_kernel(FusedStepArgs args) {
  constexpr int K = R::Cols::kReduces;
  __shared__ double sums[K][kThreads];
  const Item<T, TS, C, SR, R> it = open_item<T, TS, C, SR, R>(args, blockIdx.x);
  double acc[K] = {};
  direction_sumsq<T, TS, C, SR, R, kThreads>(it, threadIdx.x, acc);
  for (int j = 0; j < K; ++j) sums[j][threadIdx.x] = acc[j];
  __syncthreads();
  for (int j = 0; j < K; ++j) tree_sum<true>(sums[j], threadIdx.x);
  if (threadIdx.x == 0) {
    for (int j = 0; j < K; ++j) args.squares[j * args.squares_stride + blockIdx.x] = sums[j][0];
  }
}

template <int D> struct Type;  // the C++ type of a registry DType
template <> struct Type<kFloat32> { using type = float; };
template <> struct Type<kBfloat16> { using type = __nv_bfloat16; };
template <> struct Type<kFloat16> { using type = __half; };
template <> struct Type<kInt8> { using type = int8_t; };  // 8-bit state: codes (update_quantized)
template <typename T, typename TS, int C, int SR> struct Storage {
  using param = T;
  using state = TS;
  static constexpr int codec = C;
  static constexpr bool stochastic_state = SR == kStateStochastic;
};

// f(Storage<T, TS, C, SR>{}, Rule{}) for the runtime codes (a storage id of part Part: registry.py's STORAGES whose
// id % kStepParts is Part); false when a code is unknown or of another part.
template <int Part, typename F>
bool with_types(int rule, int storage, F&& f) {
  auto with = [&](auto types) { return with_rule(rule, [&](auto r) { f(types, r); }); };
  switch (storage) {
#define UF_CASE(id, P, S, C, SR)                                                         \
  case id:                                                                               \
    if constexpr (id % kStepParts == Part) {                                             \
      return with(Storage<typename Type<P>::type, typename Type<S>::type, C, SR>{});     \
    } else {                                                                             \
      return false;                                                                      \
    }
    UF_STORAGES(UF_CASE)
#undef UF_CASE
    default: return false;
  }
}

}  // namespace

template <int Part>
cudaError_t launch_fused_step_part(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream) {
  if (args.n_items == 0) return cudaSuccess;
  const bool known = with_types<Part>(rule, storage, [&](auto types, auto r) {
    using D = decltype(types);
    fused_step_kernel<typename D::param, typename D::state, D::codec, D::stochastic_state, decltype(r)>
        <<<static_cast<unsigned>(args.n_items), kThreads, 0, stream>>>(args);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

template <int Part>
bool run_fused_step_on_host_part(const FusedStepArgs& args, int rule, int storage) {
  return with_types<Part>(rule, storage, [&](auto types, auto r) {
    using D = decltype(types);
    run_on_host<typename D::param, typename D::state, D::codec, D::stochastic_state, decltype(r)>(args);
  });
}

template <int Part>
cudaError_t launch_grad_sumsq_part(const FusedStepArgs& args, double* out, int rule, int storage,
                                   cudaStream_t stream) {
  if (args.n_items == 0) return cudaSuccess;
  const bool known = with_types<Part>(rule, storage, [&](auto types, auto r) {
    grad_sumsq_kernel<typename decltype(types)::param, decltype(r)>
        <<<static_cast<unsigned>(args.n_items), kThreads, 0, stream>>>(args, out);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

template <int Part>
bool run_grad_sumsq_on_host_part(const FusedStepArgs& args, double* out, int rule, int storage) {
  return with_types<Part>(rule, storage, [&](auto types, auto r) {
    double sums[kThreads];  // the device's lanes and tree, one after another: its order of additions
    for (int64_t item = 0; item < args.n_items; ++item) {
      for (int lane = 0; lane < kThreads; ++lane) {
        sums[lane] = chunk_sumsq<typename decltype(types)::param, decltype(r), kThreads>(args, item, lane);
      }
      tree_sum<false>(sums, 0);
      out[item] = sums[0];
    }
  });
}

template <int Part>
cudaError_t launch_direction_sumsq_part(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream) {
  bool ran = false;
  with_types<Part>(rule, storage, [&](auto types, auto r) {
    using D = decltype(types);
    if constexpr (HasDirection<decltype(r)>::value) {
      if (args.n_items > 0) {
        direction_sumsq_kernel<typename D::param, typename D::state, D::codec, D::stochastic_state, decltype(r)>
            <<<static_cast<unsigned>(args.n_items), kThreads, 0, stream>>>(args);
      }
      ran = true;
    }
  });
  return ran ? cudaGetLastError() : cudaErrorInvalidValue;
}

template <int Part>
bool run_direction_sumsq_on_host_part(const FusedStepArgs& args, int rule, int storage) {
  bool ran = false;
  with_types<Part>(rule, storage, [&](auto types, auto r) {
    using D = decltype(types);
    using R = decltype(r);
    if constexpr (HasDirection<R>::value) {
      constexpr int K = R::Cols::kReduces;
      double sums[K][kThreads];  // the device's lanes and trees, one after another: its additions
      for (int64_t item = 0; item < args.n_items; ++item) {
        const auto it = open_item<typename D::param, typename D::state, D::codec, D::stochastic_state, R>(args, item);
        for (int lane = 0; lane < kThreads; ++lane) {
          double acc[K] = {};
          direction_sumsq<typename D::param, typename D::state, D::codec, D::stochastic_state, R, kThreads>(
              it, lane, acc);
          for (int j = 0; j < K; ++j) sums[j][lane] = acc[j];
        }
        for (int j = 0; j < K; ++j) {
          tree_sum<false>(sums[j], 0);
          args.squares[j * args.squares_stride + item] = sums[j][0];
        }
      }
      ran = true;
    }
  });
  return ran;
}

}  // namespace uf

// The explicit instantiations of part P's launchers: the whole of fused_step_part<P>.cu.
#define UF_STEP_PART(P)                                                                                          \
  namespace uf {                                                                                                 \
  template cudaError_t launch_fused_step_part<P>(const FusedStepArgs&, int, int, cudaStream_t);                  \
  template bool run_fused_step_on_host_part<P>(const FusedStepArgs&, int, int);                                  \
  template cudaError_t launch_grad_sumsq_part<P>(const FusedStepArgs&, double*, int, int, cudaStream_t);         \
  template bool run_grad_sumsq_on_host_part<P>(const FusedStepArgs&, double*, int, int);                         \
  template cudaError_t launch_direction_sumsq_part<P>(const FusedStepArgs&, int, int, cudaStream_t);             \
  template bool run_direction_sumsq_on_host_part<P>(const FusedStepArgs&, int, int);                             \
  }
