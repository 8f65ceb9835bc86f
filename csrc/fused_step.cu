// The launchers of launch.h: each hands a storage to the translation unit that compiled it (fused_step_part<P>.cu,
// P = storage % kStepParts).
#include <type_traits>
#include <utility>

#include "launch.h"
#include "updates.cuh"

namespace uf {
namespace {

// f(std::integral_constant<int, P>{}) for the part P of `storage`; `unknown` for an id outside registry.py's STORAGES.
template <typename R, typename F, int... P>
R in_part(int storage, R unknown, F&& f, std::integer_sequence<int, P...>) {
  if (storage < 0 || storage >= kNumStorages) return unknown;
  R out = unknown;
  ((storage % kStepParts == P ? (out = f(std::integral_constant<int, P>{}), true) : false) || ...);
  return out;
}

template <typename R, typename F>
R in_part(int storage, R unknown, F&& f) {
  return in_part(storage, unknown, f, std::make_integer_sequence<int, kStepParts>{});
}

}  // namespace

bool rule_layout(int rule, int* tensor_cols, int* group_cols, int* reduces, bool* projects) {
  return with_rule(rule, [&](auto r) {
    using R = decltype(r);
    *tensor_cols = kState0 + R::Cols::kStates;
    *group_cols = R::Cols::kCols;
    *reduces = R::Cols::kReduces;
    if (projects != nullptr) *projects = R::Cols::kProjects != 0;
  });
}

cudaError_t launch_fused_step(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream) {
  return in_part(storage, cudaErrorInvalidValue,
                 [&](auto p) { return launch_fused_step_part<p()>(args, rule, storage, stream); });
}

bool run_fused_step_on_host(const FusedStepArgs& args, int rule, int storage) {
  return in_part(storage, false, [&](auto p) { return run_fused_step_on_host_part<p()>(args, rule, storage); });
}

cudaError_t launch_grad_sumsq(const FusedStepArgs& args, double* out, int rule, int storage, cudaStream_t stream) {
  return in_part(storage, cudaErrorInvalidValue,
                 [&](auto p) { return launch_grad_sumsq_part<p()>(args, out, rule, storage, stream); });
}

bool run_grad_sumsq_on_host(const FusedStepArgs& args, double* out, int rule, int storage) {
  return in_part(storage, false, [&](auto p) { return run_grad_sumsq_on_host_part<p()>(args, out, rule, storage); });
}

cudaError_t launch_direction_sumsq(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream) {
  return in_part(storage, cudaErrorInvalidValue,
                 [&](auto p) { return launch_direction_sumsq_part<p()>(args, rule, storage, stream); });
}

bool run_direction_sumsq_on_host(const FusedStepArgs& args, int rule, int storage) {
  return in_part(storage, false, [&](auto p) { return run_direction_sumsq_on_host_part<p()>(args, rule, storage); });
}

}  // namespace uf
