// The per-element update of each rule: backends/reference.py, term by term, in float32.
// One definition for the host (what CI tests without a GPU) and the device (what the kernel calls).
//
// A rule is a functor: Cols (its columns of the group table, csrc/registry.h), kStates state slots,
// Scalars (what every element of one tensor's chunk needs, made once per work item by scalars() from
// the group row, the applied lr and the tensor's step count k after this update), and update(), one
// element: p the parameter, g its gradient, s the state slots in the order of registry.py. The launcher
// (fused_step.cuh) knows no rule: it loads, calls update() and stores.
#pragma once

#include <math.h>

#include "registry.h"
#include "schedules.cuh"

namespace uf {

UF_HD float f32(double x) { return static_cast<float>(x); }

// 1 - b^k, in float64, from log b (a column of the group row): one exp, however large k.
UF_HD double bias_correction(const double* row, int log_beta, float k) {
  return 1.0 - exp(static_cast<double>(k) * row[log_beta]);
}

// AdamW and AdaBelief read the same columns.
struct AdamScalars {
  float decay, b1, omb1, b2, omb2, eps;
  float step_size;  // lr / (1 - b1^k), bias correction in float64
  float sqrt_bc2;   // sqrt(1 - b2^k)
};

template <class Cols>
UF_HD AdamScalars adam_scalars(const double* row, float lr, float k) {
  return {1.0f - lr * f32(row[Cols::kWeightDecay]), f32(row[Cols::kBeta1]), f32(row[Cols::kOneMinusBeta1]),
          f32(row[Cols::kBeta2]), f32(row[Cols::kOneMinusBeta2]), f32(row[Cols::kEps]),
          f32(static_cast<double>(lr) / bias_correction(row, Cols::kLogBeta1, k)),
          f32(sqrt(bias_correction(row, Cols::kLogBeta2, k)))};
}

struct AdamW {
  using Cols = adamw;
  using Scalars = AdamScalars;
  static UF_HD Scalars scalars(const double* row, float lr, float k) { return adam_scalars<Cols>(row, lr, k); }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    p = p * c.decay;
    s[0] = s[0] * c.b1 + g * c.omb1;
    s[1] = s[1] * c.b2 + g * g * c.omb2;
    p = p - s[0] / (sqrtf(s[1]) / c.sqrt_bc2 + c.eps) * c.step_size;
  }
};

struct AdaBelief {
  using Cols = adabelief;
  using Scalars = AdamScalars;
  static UF_HD Scalars scalars(const double* row, float lr, float k) { return adam_scalars<Cols>(row, lr, k); }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    p = p * c.decay;
    s[0] = s[0] * c.b1 + g * c.omb1;
    const float r = g - s[0];
    s[1] = s[1] * c.b2 + r * r * c.omb2 + c.eps;
    p = p - s[0] / (sqrtf(s[1]) / c.sqrt_bc2 + c.eps) * c.step_size;
  }
};

struct Lion {
  using Cols = lion;
  struct Scalars {
    float lr, decay, b1, omb1, b2, omb2;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float) {
    return {lr, 1.0f - lr * f32(row[Cols::kWeightDecay]), f32(row[Cols::kBeta1]), f32(row[Cols::kOneMinusBeta1]),
            f32(row[Cols::kBeta2]), f32(row[Cols::kOneMinusBeta2])};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    const float u = s[0] * c.b1 + g * c.omb1;
    const float sign = u > 0.0f ? 1.0f : (u < 0.0f ? -1.0f : 0.0f);
    p = p * c.decay - sign * c.lr;
    s[0] = s[0] * c.b2 + g * c.omb2;
  }
};

// torch.optim.SGD: L2 decay into the gradient; the buffer starts as the first gradient.
struct SGD {
  using Cols = sgd;
  struct Scalars {
    float lr, wd, mom, omdamp;
    bool nesterov, first;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k) {
    return {lr, f32(row[Cols::kWeightDecay]), f32(row[Cols::kMomentum]), f32(row[Cols::kOneMinusDampening]),
            row[Cols::kNesterov] != 0.0, k == 1.0f};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    g = g + c.wd * p;
    if (c.mom != 0.0f) {  // momentum 0 keeps no buffer (the group's has_state is 0)
      s[0] = c.first ? g : s[0] * c.mom + g * c.omdamp;
      g = c.nesterov ? g + c.mom * s[0] : s[0];
    }
    p = p - g * c.lr;
  }
};

// Adan, as its PyTorch reference computes it (sail-sg/Adan, _single_tensor_adan): s = exp_avg, exp_avg_sq,
// exp_avg_diff, neg_pre_grad (minus the previous gradient; on a parameter's first step, minus this one).
struct Adan {
  using Cols = adan;
  struct Scalars {
    float lr, wd, b1, omb1, b2, omb2, b3, omb3, eps;
    float step_size;       // lr / (1 - b1^k)
    float step_size_diff;  // lr b2 / (1 - b2^k)
    float sqrt_bc3;        // sqrt(1 - b3^k)
    bool no_prox, first;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k) {
    const double lr64 = lr;
    return {lr, f32(row[Cols::kWeightDecay]), f32(row[Cols::kBeta1]), f32(row[Cols::kOneMinusBeta1]),
            f32(row[Cols::kBeta2]), f32(row[Cols::kOneMinusBeta2]), f32(row[Cols::kBeta3]),
            f32(row[Cols::kOneMinusBeta3]), f32(row[Cols::kEps]),
            f32(lr64 / bias_correction(row, Cols::kLogBeta1, k)),
            f32(lr64 * row[Cols::kBeta2] / bias_correction(row, Cols::kLogBeta2, k)),
            f32(sqrt(bias_correction(row, Cols::kLogBeta3, k))), row[Cols::kNoProx] != 0.0, k == 1.0f};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    const float diff = c.first ? 0.0f : g + s[3];  // g - the previous gradient
    s[0] = s[0] * c.b1 + g * c.omb1;
    s[2] = s[2] * c.b2 + diff * c.omb2;
    const float u = g + c.b2 * diff;
    s[1] = s[1] * c.b3 + u * u * c.omb3;
    const float denom = sqrtf(s[1]) / c.sqrt_bc3 + c.eps;
    if (c.no_prox) {
      p = p * (1.0f - c.lr * c.wd) - s[0] / denom * c.step_size - s[2] / denom * c.step_size_diff;
    } else {
      p = (p - s[0] / denom * c.step_size - s[2] / denom * c.step_size_diff) / (1.0f + c.lr * c.wd);
    }
    s[3] = -g;
  }
};

// torch.optim.Adagrad: L2 decay into the gradient, the lr decayed by the tensor's step count, s = the sum of squares.
struct Adagrad {
  using Cols = adagrad;
  struct Scalars {
    float clr, wd, eps;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k) {
    return {f32(static_cast<double>(lr) / (1.0 + (static_cast<double>(k) - 1.0) * row[Cols::kLrDecay])),
            f32(row[Cols::kWeightDecay]), f32(row[Cols::kEps])};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    g = g + c.wd * p;
    s[0] = s[0] + g * g;
    p = p - g / (sqrtf(s[0]) + c.eps) * c.clr;
  }
};

// timm's Lars: SGD with momentum on (g + wd p) times the tensor's trust ratio, from its sums of squares `red` (the
// parameter's, the gradient's) and the factor the gradient is scaled by (gscale), in float64 (reference.py:
// _trust_ratio).
struct Lars {
  using Cols = lars;
  struct Scalars {
    SGD::Scalars sgd;  // with weight decay 0: Lars adds it before the ratio
    float wd, ratio;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k, const double* red, float gscale) {
    const double w = sqrt(red[0]), gn = sqrt(red[1]) * static_cast<double>(gscale);
    double ratio = row[Cols::kTrustCoeff] * w / (gn + w * row[Cols::kWeightDecay] + row[Cols::kEps]);
    if (!(w > 0.0 && gn > 0.0)) ratio = 1.0;
    if (row[Cols::kTrustClip] != 0.0) ratio = fmin(ratio / static_cast<double>(lr), 1.0);
    if (row[Cols::kAdapt] == 0.0) ratio = 1.0;
    return {{lr, 0.0f, f32(row[Cols::kMomentum]), f32(row[Cols::kOneMinusDampening]), row[Cols::kNesterov] != 0.0,
             k == 1.0f},
            f32(row[Cols::kWeightDecay]), f32(ratio)};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    SGD::update(p, (g + c.wd * p) * c.ratio, s, c.sgd);
  }
};

// torch-optimizer's DiffGrad: L2 decay into the gradient, Adam's moments, the first times the friction
// 1 / (1 + exp(-|g_prev - g|)) per element; s[2] keeps g (with its decay) for the next step.
struct DiffGrad {
  using Cols = diffgrad;
  struct Scalars {
    float wd, b1, omb1, b2, omb2, eps;
    float step_size;  // lr sqrt(1 - b2^k) / (1 - b1^k), in float64
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k) {
    return {f32(row[Cols::kWeightDecay]), f32(row[Cols::kBeta1]), f32(row[Cols::kOneMinusBeta1]),
            f32(row[Cols::kBeta2]), f32(row[Cols::kOneMinusBeta2]), f32(row[Cols::kEps]),
            f32(static_cast<double>(lr) * sqrt(bias_correction(row, Cols::kLogBeta2, k)) /
                bias_correction(row, Cols::kLogBeta1, k))};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    g = g + c.wd * p;
    s[0] = s[0] * c.b1 + g * c.omb1;
    s[1] = s[1] * c.b2 + g * g * c.omb2;
    const float friction = 1.0f / (1.0f + expf(-fabsf(s[2] - g)));
    p = p - s[0] * friction / (sqrtf(s[1]) + c.eps) * c.step_size;
    s[2] = g;
  }
};

// timm's Lamb: Adam's direction, bias corrected, plus L2 decay (direction(), which the pre-pass also calls, on copies
// of the state), times lr and the tensor's trust ratio ||p|| / ||r|| from its sums of squares `red` (the pre-pass's,
// summed over shards), in float64 (reference.py: _lamb). `red` is null in the pre-pass, which applies nothing.
struct Lamb {
  using Cols = lamb;
  struct Scalars {
    float b1, b3, b2, omb2, eps, wd, inv_bc1, sqrt_bc2;
    float step;  // lr times the trust ratio
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k, const double* red, float) {
    double step = lr;
    if (red != nullptr && row[Cols::kAdapt] != 0.0) {
      const double w = sqrt(red[0]), rn = sqrt(red[1]);
      double ratio = w > 0.0 && rn > 0.0 ? w / rn : 1.0;
      if (row[Cols::kTrustClip] != 0.0) ratio = fmin(ratio, 1.0);
      step *= ratio;
    }
    return {f32(row[Cols::kBeta1]), f32(row[Cols::kBeta3]), f32(row[Cols::kBeta2]), f32(row[Cols::kOneMinusBeta2]),
            f32(row[Cols::kEps]), f32(row[Cols::kWeightDecay]), f32(1.0 / bias_correction(row, Cols::kLogBeta1, k)),
            f32(sqrt(bias_correction(row, Cols::kLogBeta2, k))), f32(step)};
  }
  static UF_HD float direction(float p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    s[0] = s[0] * c.b1 + g * c.b3;
    s[1] = s[1] * c.b2 + g * g * c.omb2;
    return s[0] / (sqrtf(s[1]) / c.sqrt_bc2 + c.eps) * c.inv_bc1 + c.wd * p;
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    p = p - direction(p, g, s, c) * c.step;
  }
};

// The adamp package's AdamP and SGDP (reference.py: _adamp, _sgdp): a direction (direction(), which the pre-pass also
// calls, on copies of the state) less `coef` p, coef the projection's coefficient of the element's row
// (backends/projection.py), with the decoupled decay scaled by the tensor's factor red[2] (Rows.meta: 1 in the
// pre-pass). Their Cols::kProjects: update() takes coef.
struct AdamP {
  using Cols = adamp;
  struct Scalars {
    float decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2;
    bool nesterov;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k, const double* red, float) {
    return {f32(1.0 - static_cast<double>(lr) * row[Cols::kWeightDecay] * red[2]), f32(row[Cols::kBeta1]),
            f32(row[Cols::kOneMinusBeta1]), f32(row[Cols::kBeta2]), f32(row[Cols::kOneMinusBeta2]),
            f32(row[Cols::kEps]), f32(static_cast<double>(lr) / bias_correction(row, Cols::kLogBeta1, k)),
            f32(sqrt(bias_correction(row, Cols::kLogBeta2, k))), row[Cols::kNesterov] != 0.0};
  }
  static UF_HD float direction(float p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    s[0] = s[0] * c.b1 + g * c.omb1;
    s[1] = s[1] * c.b2 + g * g * c.omb2;
    const float denom = sqrtf(s[1]) / c.sqrt_bc2 + c.eps;
    return (c.nesterov ? s[0] * c.b1 + g * c.omb1 : s[0]) / denom;
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c, float coef) {
    const float u = direction(p, g, s, c) - coef * p;
    p = p * c.decay - u * c.step_size;
  }
};

struct SGDP {
  using Cols = sgdp;
  struct Scalars {
    float lr, decay, mom, omdamp;
    bool nesterov;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k, const double* red, float) {
    const double mom = row[Cols::kMomentum];
    return {lr, f32(1.0 - static_cast<double>(lr) * row[Cols::kWeightDecay] * red[2] / (1.0 - mom)), f32(mom),
            f32(row[Cols::kOneMinusDampening]), row[Cols::kNesterov] != 0.0};
  }
  static UF_HD float direction(float p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    s[0] = s[0] * c.mom + g * c.omdamp;
    return c.nesterov ? g + c.mom * s[0] : s[0];
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c, float coef) {
    const float u = direction(p, g, s, c) - coef * p;
    if (!c.nesterov) s[0] = u;  // the buffer is the direction, which the package projects in place
    p = p * c.decay - u * c.lr;
  }
};

// The sgd-sai package's SGD_sai (reference.py: _sgd_sai): the buffer (the first gradient, then momentum b + (1 -
// momentum) g; none with momentum 0), decoupled decay, the step lr gsnr. The g-SNR is measured at the tensor's first
// step from its moments `red` (backends/snr.py: gsnr, in float64, of the gradient times gscale), else it is the one
// the tensor keeps (`kept`, its scalar state); finish_item writes it back with the step count (Cols::kMeasures).
struct SgdSai {
  using Cols = sgd_sai;
  struct Scalars {
    float decay, step, mom, omm;
    bool first;
    float gsnr;
  };
  static UF_HD Scalars scalars(const double* row, float lr, float k, const double* red, float gscale, float kept) {
    const bool first = k == 1.0f;
    float gsnr = kept;
    if (first && red != nullptr) {
      const double total = red[0], squares = red[1], count = red[2], s = gscale;
      const double var = (squares - total * total / fmax(count, 1.0)) / fmax(count - 1.0, 1.0);
      const double std = count > 1.0 ? sqrt(fmax(var, 0.0)) : 0.0;
      gsnr = f32(s * sqrt(squares) / (s * std + row[Cols::kEps]));
    }
    const double lr64 = lr;
    return {f32(1.0 - lr64 * row[Cols::kWeightDecay]), f32(lr64 * static_cast<double>(gsnr)), f32(row[Cols::kMomentum]),
            f32(row[Cols::kOneMinusMomentum]), first, gsnr};
  }
  static UF_HD void update(float& p, float g, float (&s)[Cols::kStates], const Scalars& c) {
    if (c.mom != 0.0f) {  // momentum 0 keeps no buffer (the group's has_state is 0)
      s[0] = c.first ? g : s[0] * c.mom + g * c.omm;
      g = s[0];
    }
    p = p * c.decay - g * c.step;
  }
};

// f(Rule{}) for a rule id; false when the id is unknown. The one place a new rule is listed in C++.
template <typename F>
bool with_rule(int id, F&& f) {
  switch (id) {
    case AdamW::Cols::kId: f(AdamW{}); return true;
    case AdaBelief::Cols::kId: f(AdaBelief{}); return true;
    case Lion::Cols::kId: f(Lion{}); return true;
    case SGD::Cols::kId: f(SGD{}); return true;
    case Adan::Cols::kId: f(Adan{}); return true;
    case Adagrad::Cols::kId: f(Adagrad{}); return true;
    case Lars::Cols::kId: f(Lars{}); return true;
    case Lamb::Cols::kId: f(Lamb{}); return true;
    case DiffGrad::Cols::kId: f(DiffGrad{}); return true;
    case AdamP::Cols::kId: f(AdamP{}); return true;
    case SGDP::Cols::kId: f(SGDP{}); return true;
    case SgdSai::Cols::kId: f(SgdSai{}); return true;
    default: return false;
  }
}

// The factor each gradient of group row `row` is multiplied by as it is loaded (Rule.clipping in registry.py):
// 1 / amp_scale, the scale GradScaler multiplied the loss by (1 without one), times the clipping factor
// min(1, max_grad_norm / (norm / amp_scale + eps)) of the unscaled gradients (as scaler.unscale_ then
// clip_grad_norm_), in float64; the clipping factor is 1 when the group does not clip (its max_grad_norm is 0;
// `norm` is then not read). A NaN norm gives a NaN factor, as torch.nn.utils.clip_grad_norm_ and backend "torch"
// give (fmin would return 1 and apply the gradients unclipped); an infinite norm gives 0.
UF_HD float grad_scale(const double* row, const double* norm, float amp_scale) {
  const double inv = 1.0f / amp_scale;  // in float32, as every backend (exact for GradScaler's powers of two)
  const double max_norm = row[kMaxGradNorm];
  if (!(max_norm > 0.0)) return f32(inv);
  const double scale = max_norm / (*norm * inv + row[kClipEps]);
  return f32((scale >= 1.0 ? 1.0 : scale) * inv);
}

// lr of group row `row` at its step counter t; `table`: its schedule's factors (a kTable schedule, schedules.Table:
// read at min(t, total - 1); its address is the group's kTableAddress).
UF_HD float group_lr(const double* row, int64_t t, const float* table) {
  if (static_cast<int>(row[kKind]) == kTable) {
    const int64_t last = static_cast<int64_t>(row[kTotal]) - 1;
    return f32(row[kLr]) * table[t < last ? t : last];
  }
  const ScheduleConsts c{static_cast<int>(row[kKind]), f32(row[kWarmup]), f32(row[kTotal]), f32(row[kMinRatio]),
                         f32(row[kPhi])};
  return f32(row[kLr]) * schedule_factor(c, static_cast<float>(t));
}

}  // namespace uf
