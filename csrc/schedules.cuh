// lr factor of every schedule family: the formulas of uba_fused/schedules.py, in float32.
// Host and device share this one definition (the host build is what CI can test without a GPU).
#pragma once

#include <math.h>

#include "registry.h"

#ifdef __CUDACC__
#define UF_HD __host__ __device__ __forceinline__
#else
#define UF_HD inline
#endif

namespace uf {

struct ScheduleConsts {
  int kind;         // ScheduleKind (registry.h)
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
    case kUba: {
      float c = 1.0f + cosf(3.14159265358979323846f * p);
      shape = 2.0f * c / (2.0f * s.phi + (2.0f - s.phi) * c);
      break;
    }
    case kCosine: shape = 0.5f * (1.0f + cosf(3.14159265358979323846f * p)); break;
    case kLinear: shape = 1.0f - p; break;
    case kRex: shape = (1.0f - p) / (1.0f - 0.5f * p); break;
    default: return NAN;  // kTable (group_lr reads its table), or no such kind: the host never writes one (a visible
                          // failure, never another schedule)
  }
  return s.min_ratio + (1.0f - s.min_ratio) * shape;
}

}  // namespace uf
