// Host launchers implemented in the .cu files, callable from bindings.cpp without CUDA headers of torch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "schedules.cuh"

namespace uf {

// out[i] = schedule_factor(s, steps[i]) for i < n; returns the launch's error code.
cudaError_t launch_schedule_factor(const int64_t* steps, float* out, int64_t n, ScheduleConsts s,
                                   cudaStream_t stream);

}  // namespace uf
