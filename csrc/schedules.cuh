// lr factor of every schedule family: the formulas of uba_fused/schedules.py, in float32.
// Host and device share this one definition (the host build is what CI can test without a GPU).
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define UF_HD __host__ __device__ __forceinline__
#else
#define UF_HD inline
#endif

namespace uf {

// Ids shared with uba_fused/schedules.py (KIND_*).
enum ScheduleKind : int { kConstant = 0, kUBA = 1, kCosine = 2, kLinear = 3, kRex = 4 };

struct ScheduleConsts {
  int kind;
  float warmup;     // W
  float total;      // T (unused by kConstant)
  float min_ratio;  // r
  float phi;        // UBA only
};

// factor(t) for the 0-based step index t.
UF_HD float schedule_factor(const ScheduleConsts& s, float t) {
  if (t < s.warmup) return (t + 1.0f) / s.warmup;
  if (s.kind == kConstant) return 1.0f;
  float p = fminf(fmaxf((t - s.warmup) / fmaxf(s.total - s.warmup, 1.0f), 0.0f), 1.0f);  // T - W >= 1
  float shape;
  switch (s.kind) {
    case kUBA: {
      float c = 1.0f + cosf(3.14159265358979323846f * p);
      shape = 2.0f * c / (2.0f * s.phi + (2.0f - s.phi) * c);
      break;
    }
    case kCosine: shape = 0.5f * (1.0f + cosf(3.14159265358979323846f * p)); break;
    case kLinear: shape = 1.0f - p; break;
    default: shape = (1.0f - p) / (1.0f - 0.5f * p); break;  // kRex
  }
  return s.min_ratio + (1.0f - s.min_ratio) * shape;
}

}  // namespace uf
