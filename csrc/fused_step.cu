// One launch per step over a whole parameter list, from the device tables of backends/plan.py.
// The CUDA twin of backends/triton.py: the same tables, chunks, counters and math (updates.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"
#include "updates.cuh"

namespace uf {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// 16 bytes hold kVec<T> elements; they travel as one uint4 through streaming (evict-first) global
// loads and stores, since every element is read once and written once per step.
template <typename T> constexpr int kVec = 16 / sizeof(T);

__device__ __forceinline__ float bits_to_float(unsigned bits, float*) { return __uint_as_float(bits); }
__device__ __forceinline__ float bits_to_float(unsigned short bits, __nv_bfloat16*) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
__device__ __forceinline__ float bits_to_float(unsigned short bits, __half*) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ unsigned float_to_bits(float x, float*) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned short float_to_bits(float x, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ unsigned short float_to_bits(float x, __half*) { return __half_as_ushort(__float2half_rn(x)); }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kVec<T>]) {
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
__device__ __forceinline__ uint4 pack(const float (&in)[kVec<T>]) {
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

template <typename T, int RULE>
__device__ __forceinline__ void update_vector(T* p, const T* g, T* a, T* b, int64_t i, const RuleScalars& s) {
  constexpr int N = kVec<T>;
  float pf[N], gf[N], af[N], bf[N];
  unpack<T>(__ldcs(reinterpret_cast<const uint4*>(p) + i), pf);
  unpack<T>(__ldcs(reinterpret_cast<const uint4*>(g) + i), gf);
  if (s.has_state) unpack<T>(__ldcs(reinterpret_cast<const uint4*>(a) + i), af);
  if (RULE <= kAdaBelief) unpack<T>(__ldcs(reinterpret_cast<const uint4*>(b) + i), bf);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (!s.has_state) af[j] = gf[j];
    update<RULE>(pf[j], gf[j], af[j], bf[j], s);
  }
  __stcs(reinterpret_cast<uint4*>(p) + i, pack<T>(pf));
  if (s.has_state) __stcs(reinterpret_cast<uint4*>(a) + i, pack<T>(af));
  if (RULE <= kAdaBelief) __stcs(reinterpret_cast<uint4*>(b) + i, pack<T>(bf));
}

template <typename T, int RULE>
__device__ __forceinline__ void update_scalar(T* p, const T* g, T* a, T* b, int64_t i, const RuleScalars& s) {
  float pf = to_float(p[i]), gf = to_float(g[i]);
  float af = s.has_state ? to_float(a[i]) : gf;
  float bf = RULE <= kAdaBelief ? to_float(b[i]) : 0.0f;
  update<RULE>(pf, gf, af, bf, s);
  p[i] = from_float<T>(pf);
  if (s.has_state) a[i] = from_float<T>(af);
  if (RULE <= kAdaBelief) b[i] = from_float<T>(bf);
}

template <typename T, int RULE>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(FusedStepArgs args) {
  const int64_t item = blockIdx.x;
  const int64_t slot = args.work[2 * item];
  const int64_t start = args.work[2 * item + 1];
  const int64_t* row = args.tensors + slot * kTensorCols;
  T* p = reinterpret_cast<T*>(row[kParam]);
  const T* g = reinterpret_cast<const T*>(row[kGrad]);
  T* a = reinterpret_cast<T*>(row[kState0]);
  T* b = reinterpret_cast<T*>(row[kState1]);
  float* step = reinterpret_cast<float*>(row[kStep]);
  const int64_t numel = row[kNumel];
  const int64_t info = row[kInfo];
  const double* grow = args.groups + row[kGroup] * kGroupCols;
  const int64_t* counter = reinterpret_cast<const int64_t*>(args.gaddr[2 * row[kGroup]]);

  const float k = *step + 1.0f;  // this tensor's step count after this update
  const RuleScalars s = rule_scalars(grow, group_lr(grow, static_cast<float>(*counter)), k);

  const int64_t end = min(start + static_cast<int64_t>(kChunk), numel);
  if ((info & 1) && end - start == kChunk) {  // aligned full chunk: 128-bit accesses, no bounds checks
    const int64_t v0 = start / kVec<T>;
#pragma unroll
    for (int i = threadIdx.x; i < kChunk / kVec<T>; i += kThreads) update_vector<T, RULE>(p, g, a, b, v0 + i, s);
  } else {
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) update_scalar<T, RULE>(p, g, a, b, i, s);
  }

  // Counters, as in triton.py: every thread's reads of this step's counters precede the release;
  // the last chunk of a tensor writes its step; the last tensor advances every group.
  __syncthreads();
  if (threadIdx.x != 0) return;
  __threadfence();
  if (atomicAdd(args.done + slot, 1) != (info >> 1) - 1) return;
  args.done[slot] = 0;
  if (slot < args.n_rows - 1) *step = k;  // the last row is the sentinel
  __threadfence();
  if (atomicAdd(args.done + args.n_rows, 1) != args.n_rows - 1) return;
  args.done[args.n_rows] = 0;
  __threadfence();
  if (!args.advance) return;
  for (int gi = 0; gi < args.n_groups; ++gi) {
    int64_t* c = reinterpret_cast<int64_t*>(args.gaddr[2 * gi]);
    float* lr_out = reinterpret_cast<float*>(args.gaddr[2 * gi + 1]);
    *lr_out = group_lr(args.groups + gi * kGroupCols, static_cast<float>(*c));
    *c += 1;
  }
}

template <typename T>
cudaError_t launch_typed(const FusedStepArgs& args, int rule, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.n_items)), block(kThreads);
  switch (rule) {
    case kAdamW: fused_step_kernel<T, kAdamW><<<grid, block, 0, stream>>>(args); break;
    case kAdaBelief: fused_step_kernel<T, kAdaBelief><<<grid, block, 0, stream>>>(args); break;
    case kLion: fused_step_kernel<T, kLion><<<grid, block, 0, stream>>>(args); break;
    case kSGD: fused_step_kernel<T, kSGD><<<grid, block, 0, stream>>>(args); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_step(const FusedStepArgs& args, int rule, int dtype, cudaStream_t stream) {
  if (args.n_items == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32: return launch_typed<float>(args, rule, stream);
    case kBFloat16: return launch_typed<__nv_bfloat16>(args, rule, stream);
    case kFloat16: return launch_typed<__half>(args, rule, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace uf
