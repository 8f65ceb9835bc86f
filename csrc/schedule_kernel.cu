// A kernel that evaluates the device schedule function for a tensor of step counters:
// the end-to-end check that what the optimizer kernels compute on the GPU is schedules.py.
#include "launch.h"

namespace uf {

__global__ void schedule_factor_kernel(const int64_t* __restrict__ steps, float* __restrict__ out, int64_t n,
                                       ScheduleConsts s) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = schedule_factor(s, static_cast<float>(steps[i]));
}

cudaError_t launch_schedule_factor(const int64_t* steps, float* out, int64_t n, ScheduleConsts s,
                                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  schedule_factor_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(steps, out, n, s);
  return cudaGetLastError();
}

}  // namespace uf
