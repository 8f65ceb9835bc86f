// Host launchers implemented in the .cu files, callable from bindings.cpp without CUDA headers of torch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "schedules.cuh"

namespace uf {

// out[i] = schedule_factor(s, steps[i]) for i < n; returns the launch's error code.
cudaError_t launch_schedule_factor(const int64_t* steps, float* out, int64_t n, ScheduleConsts s,
                                   cudaStream_t stream);

// The device tables of one launch (backends/plan.py documents them).
struct FusedStepArgs {
  const int64_t* work;     // [n_items, 2]
  const int64_t* tensors;  // [n_rows, kState0 + the rule's kStates]
  const int64_t* grads;    // [slots]: each tensor's gradient address (kNoGrad: none), at its kGradSlot
  const double* groups;    // [n_groups, the rule's kCols]
  const int64_t* gaddr;    // [n_groups, kGroupAddresses]
  int* done;               // [n_rows + 1]
  const double* norm;      // the global gradient norm, read by groups that clip (max_grad_norm > 0)
  const double* reduced;   // [n_rows, the rule's kReduces]: per-tensor sums of squares (a rule with kReduces)
  const float* grad_scale;  // the scale the gradients carry (torch.amp.GradScaler's; 1: none), divided out on load
  const float* found_inf;   // non-zero: GradScaler found an inf or NaN gradient, and nothing is updated
  int64_t n_items;
  int n_rows, n_groups, advance;
  int of_param;            // the pre-pass reads the parameters, not the gradients
  double* squares;         // the direction pre-pass's output: [the rule's kReduces, squares_stride >= n_items]
  int64_t squares_stride;
  const float* coefs;      // a rule that projects (kProjects): each row's coefficient; `reduced` then holds each
                           // tensor's (row length, first row in coefs, decay factor, 0) (backends/plan.py: Rows)
};

// The kernels of fused_step.cuh compile in this many translation units (fused_step_part<P>.cu, storages whose id %
// kStepParts is P), so that a build runs them in parallel: on 2 cores (nvcc 13.0, sm_80 and sm_90 with PTX) the
// whole build took 190 s with one unit.
constexpr int kStepParts = 8;

// The table widths of a rule: tensor-table columns (kState0 + its state slots) and group-table columns, and how many
// per-tensor sums its update reads, and whether it projects per row (registry.PROJECTION); false when `rule` is
// unknown.
bool rule_layout(int rule, int* tensor_cols, int* group_cols, int* reduces, bool* projects = nullptr);

// One step of `rule` over every tensor of the tables, stored as `storage` (an id of registry.py's STORAGES: the
// parameters' dtype and their state's); returns the launch's error code.
cudaError_t launch_fused_step(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream);

// The same kernel body compiled for the host, run on tables (and tensors) in CPU memory, one work item
// after another; false when `rule` or `storage` is unknown. It is how the tests run this backend without a GPU.
bool run_fused_step_on_host(const FusedStepArgs& args, int rule, int storage);

// The pre-pass over the same tables: out[item] = the sum of squares, in float64, of work item `item`'s chunk of
// a gradient (0 without one). On the device, or on the host for CPU tables; false / cudaErrorInvalidValue when
// `rule` or `storage` is unknown.
cudaError_t launch_grad_sumsq(const FusedStepArgs& args, double* out, int rule, int storage, cudaStream_t stream);
bool run_grad_sumsq_on_host(const FusedStepArgs& args, double* out, int rule, int storage);

// The pre-pass of a rule that reduces its update's direction (Rule.reduces ("param", "update"): a functor with
// direction()): squares[item] and squares[squares_stride + item] = the sums of squares, in float64, of work item
// `item`'s chunk of the parameter (as its codec reads it) and of the direction its update would apply, which it
// computes from the gradient as applied and copies of the state, writing nothing else. For a rule that projects
// (registry.PROJECTION), whose work items each lie in one row: squares[j squares_stride + item] = the sums of p^2,
// g^2, p g and p d. cudaErrorInvalidValue / false
// for an unknown storage or a rule without a direction.
cudaError_t launch_direction_sumsq(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream);
bool run_direction_sumsq_on_host(const FusedStepArgs& args, int rule, int storage);
// The same, for the storages of part Part only (fused_step_part<Part>.cu); the six above dispatch to them.
template <int Part>
cudaError_t launch_fused_step_part(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream);
template <int Part>
bool run_fused_step_on_host_part(const FusedStepArgs& args, int rule, int storage);
template <int Part>
cudaError_t launch_grad_sumsq_part(const FusedStepArgs& args, double* out, int rule, int storage, cudaStream_t stream);
template <int Part>
bool run_grad_sumsq_on_host_part(const FusedStepArgs& args, double* out, int rule, int storage);
template <int Part>
cudaError_t launch_direction_sumsq_part(const FusedStepArgs& args, int rule, int storage, cudaStream_t stream);
template <int Part>
bool run_direction_sumsq_on_host_part(const FusedStepArgs& args, int rule, int storage);

}  // namespace uf
