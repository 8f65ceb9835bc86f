// The per-element update of each optimizer: backends/reference.py, term by term, in float32.
// One definition for the host (what CI tests without a GPU) and the device (what the kernel calls).
#pragma once

#include <math.h>

#include "schedules.cuh"
#include "tables.h"

namespace uf {

// What one program needs for one tensor's chunk, from its group's row, its lr and its step count k.
struct RuleScalars {
  float lr, wd, b1, omb1, b2, omb2, eps, mom, omdamp;
  float step_size;  // lr / (1 - b1^k), bias correction in float64
  float sqrt_bc2;   // sqrt(1 - b2^k)
  bool nesterov, first, has_state;
};

UF_HD RuleScalars rule_scalars(const double* row, float lr, float k) {
  RuleScalars s;
  s.lr = lr;
  s.wd = static_cast<float>(row[kWeightDecay]);
  s.b1 = static_cast<float>(row[kBeta1]);
  s.omb1 = static_cast<float>(row[kOneMinusBeta1]);
  s.b2 = static_cast<float>(row[kBeta2]);
  s.omb2 = static_cast<float>(row[kOneMinusBeta2]);
  s.eps = static_cast<float>(row[kEps]);
  s.mom = static_cast<float>(row[kMomentum]);
  s.omdamp = static_cast<float>(row[kOneMinusDampening]);
  const double bc1 = 1.0 - exp(static_cast<double>(k) * row[kLogBeta1]);
  const double bc2 = 1.0 - exp(static_cast<double>(k) * row[kLogBeta2]);
  s.step_size = static_cast<float>(static_cast<double>(lr) / bc1);
  s.sqrt_bc2 = static_cast<float>(sqrt(bc2));
  s.nesterov = row[kNesterov] != 0.0;
  s.first = k == 1.0f;
  s.has_state = row[kHasState] != 0.0;
  return s;
}

// One element: p the parameter, g its gradient, a and b the rule's state (b unused by Lion and SGD).
template <int RULE>
UF_HD void update(float& p, float g, float& a, float& b, const RuleScalars& s) {
  if (RULE == kAdamW || RULE == kAdaBelief) {
    p = p * (1.0f - s.lr * s.wd);
    a = a * s.b1 + g * s.omb1;
    if (RULE == kAdamW) {
      b = b * s.b2 + g * g * s.omb2;
    } else {
      const float r = g - a;
      b = b * s.b2 + r * r * s.omb2 + s.eps;
    }
    p = p - a / (sqrtf(b) / s.sqrt_bc2 + s.eps) * s.step_size;
  } else if (RULE == kLion) {
    const float c = a * s.b1 + g * s.omb1;
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    p = p * (1.0f - s.lr * s.wd) - sign * s.lr;
    a = a * s.b2 + g * s.omb2;
  } else {  // SGD: L2 decay into the gradient; the buffer starts as the first gradient
    g = g + s.wd * p;
    if (s.mom != 0.0f) {
      a = s.first ? g : a * s.mom + g * s.omdamp;
      g = s.nesterov ? g + s.mom * a : a;
    }
    p = p - g * s.lr;
  }
}

// lr of group row `row` at its step counter t.
UF_HD float group_lr(const double* row, float t) {
  const ScheduleConsts c{static_cast<int>(row[kKind]), static_cast<float>(row[kWarmup]),
                         static_cast<float>(row[kTotal]), static_cast<float>(row[kMinRatio]),
                         static_cast<float>(row[kPhi])};
  return static_cast<float>(row[kLR]) * schedule_factor(c, t);
}

}  // namespace uf
