// Python bindings of uba_fused._C: the only translation unit that includes torch's heavy headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "launch.h"

namespace {

uf::ScheduleConsts consts(int64_t kind, double warmup, double total, double min_ratio, double phi) {
  TORCH_CHECK(kind >= uf::kConstant && kind <= uf::kRex, "uba_fused: unknown schedule kind ", kind);
  return {static_cast<int>(kind), static_cast<float>(warmup), static_cast<float>(total),
          static_cast<float>(min_ratio), static_cast<float>(phi)};
}

// factor(t) for an int64 CUDA tensor of step indices, evaluated by the device schedule function.
at::Tensor schedule_factor(const at::Tensor& steps, int64_t kind, double warmup, double total, double min_ratio,
                           double phi) {
  TORCH_CHECK(steps.is_cuda(), "uba_fused._C.schedule_factor: steps must be a CUDA tensor, got ", steps.device());
  TORCH_CHECK(steps.scalar_type() == at::kLong, "uba_fused._C.schedule_factor: steps must be int64, got ",
              steps.scalar_type());
  const c10::cuda::CUDAGuard guard(steps.device());
  auto s = steps.contiguous();
  auto out = at::empty(s.sizes(), s.options().dtype(at::kFloat));
  cudaError_t err = uf::launch_schedule_factor(s.data_ptr<int64_t>(), out.data_ptr<float>(), s.numel(),
                                               consts(kind, warmup, total, min_ratio, phi),
                                               c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "uba_fused: schedule_factor_kernel failed: ", cudaGetErrorString(err));
  return out;
}

// The same function compiled for the host, so CI can check the C++ formulas without a GPU.
double schedule_factor_host(int64_t step, int64_t kind, double warmup, double total, double min_ratio,
                            double phi) {
  return uf::schedule_factor(consts(kind, warmup, total, min_ratio, phi), static_cast<float>(step));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "uba_fused compiled kernels";
  m.def("schedule_factor", &schedule_factor, "factor(t) of a schedule for an int64 CUDA tensor of steps (device)",
        py::arg("steps"), py::arg("kind"), py::arg("warmup"), py::arg("total"), py::arg("min_ratio"),
        py::arg("phi"));
  m.def("schedule_factor_host", &schedule_factor_host, "factor(t) of a schedule, the C++ code run on the host",
        py::arg("step"), py::arg("kind"), py::arg("warmup"), py::arg("total"), py::arg("min_ratio"),
        py::arg("phi"));
}
