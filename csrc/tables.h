// Layouts of the device tables built by uba_fused/backends/plan.py (tests check they agree).
#pragma once

namespace uf {

// Columns of the per-group float64 table (plan.GROUP_COLS).
enum GroupCol : int {
  kLR = 0, kBeta1, kBeta2, kOneMinusBeta1, kOneMinusBeta2, kLogBeta1, kLogBeta2, kEps, kWeightDecay, kMomentum,
  kOneMinusDampening, kNesterov, kKind, kWarmup, kTotal, kMinRatio, kPhi, kHasState, kGroupCols
};

// Columns of the per-tensor int64 table (plan.TENSOR_COLS): addresses, the tensor's slot in the gradient
// table, sizes. kInfo = n_chunks << 1 | (parameter and state 16-byte aligned).
enum TensorCol : int { kParam = 0, kGradSlot, kState0, kState1, kStep, kNumel, kGroup, kInfo, kTensorCols };

// The gradient table's entry for a tensor without a gradient this step: the kernels skip it (plan.NO_GRAD).
constexpr long long kNoGrad = -1;

// Update rules (backends/triton.py _RULE_ID).
enum Rule : int { kAdamW = 0, kAdaBelief = 1, kLion = 2, kSGD = 3 };

}  // namespace uf
