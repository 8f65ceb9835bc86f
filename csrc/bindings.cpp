// Python bindings of uba_fused._C: the only translation unit that includes torch's heavy headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "launch.h"

namespace {

uf::ScheduleConsts consts(int64_t kind, double warmup, double total, double min_ratio, double phi) {
  TORCH_CHECK(kind >= 0 && kind < uf::kNumKinds, "uba_fused: unknown schedule kind ", kind);
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

// The tables of one launch, checked as a whole before any address in them is read: every table on
// the device of `work`, of its dtype, contiguous, of the rule's widths and consistent shapes, and known rule
// and storage codes.
uf::FusedStepArgs checked_args(const at::Tensor& work, const at::Tensor& tensors, const at::Tensor& grads,
                               const at::Tensor& groups, const at::Tensor& gaddr, const at::Tensor& done,
                               int64_t n_groups, bool advance, int64_t rule, int64_t storage) {
  const char* what = "uba_fused._C.fused_step: ";
  int tensor_cols = 0, group_cols = 0, reduces = 0;
  TORCH_CHECK(uf::rule_layout(static_cast<int>(rule), &tensor_cols, &group_cols, &reduces), what, "unknown rule ",
              rule);
  TORCH_CHECK(storage >= 0 && storage < uf::kNumStorages, what, "unknown storage code ", storage);
  const auto device = work.device();
  TORCH_CHECK(device.is_cuda() || device.is_cpu(), what, "the tables must be CUDA or CPU tensors, got ", device);
  const struct {
    const at::Tensor& t;
    at::ScalarType type;
    const char* name;
  } tables[] = {{work, at::kLong, "work"}, {tensors, at::kLong, "tensors"}, {grads, at::kLong, "grads"},
                {groups, at::kDouble, "groups"}, {gaddr, at::kLong, "gaddr"}, {done, at::kInt, "done"}};
  for (const auto& table : tables) {
    TORCH_CHECK(table.t.defined(), what, table.name, " is undefined");
    TORCH_CHECK(table.t.device() == device, what, table.name, " is on ", table.t.device(), ", expected ", device,
                " (the device of work)");
    TORCH_CHECK(table.t.scalar_type() == table.type, what, table.name, " must be ", table.type, ", got ",
                table.t.scalar_type());
    TORCH_CHECK(table.t.is_contiguous(), what, table.name, " must be contiguous");
  }
  TORCH_CHECK(work.dim() == 2 && work.size(1) == 2, what, "work must have shape [items, 2], got ", work.sizes());
  TORCH_CHECK(tensors.dim() == 2 && tensors.size(1) == tensor_cols && tensors.size(0) >= 1, what,
              "tensors must have shape [rows >= 1, ", tensor_cols, "] for rule ", rule, ", got ", tensors.sizes());
  TORCH_CHECK(grads.dim() == 1 && grads.numel() >= 1, what, "grads must be a vector of >= 1 addresses, got ",
              grads.sizes());
  TORCH_CHECK(n_groups >= 1 && groups.dim() == 2 && groups.size(1) == group_cols && groups.size(0) == n_groups,
              what, "groups must have shape [n_groups = ", n_groups, ", ", group_cols, "] for rule ", rule, ", got ",
              groups.sizes());
  TORCH_CHECK(gaddr.numel() == uf::kGroupAddresses * n_groups, what, "gaddr must hold ", uf::kGroupAddresses,
              " * n_groups = ", uf::kGroupAddresses * n_groups, " addresses, got ", gaddr.numel());
  TORCH_CHECK(done.numel() == tensors.size(0) + 1, what, "done must hold rows + 1 = ", tensors.size(0) + 1,
              " counters, got ", done.numel());
  return {work.data_ptr<int64_t>(), tensors.data_ptr<int64_t>(), grads.data_ptr<int64_t>(), groups.data_ptr<double>(),
          gaddr.data_ptr<int64_t>(), done.data_ptr<int>(), nullptr, nullptr, nullptr, nullptr, work.size(0),
          static_cast<int>(tensors.size(0)), static_cast<int>(n_groups), advance ? 1 : 0, 0};
}

// A rule that projects (kProjects) reads each row's coefficient from `coefs` (float32, Rows.coefs), which its
// caller must give; another rule gets null.
const float* checked_coefs(const std::optional<at::Tensor>& coefs, const char* what, int64_t rule,
                           const at::Device& device) {
  int tensor_cols = 0, group_cols = 0, reduces = 0;
  bool projects = false;
  uf::rule_layout(static_cast<int>(rule), &tensor_cols, &group_cols, &reduces, &projects);
  if (!projects) return nullptr;
  TORCH_CHECK(coefs.has_value() && coefs->defined() && coefs->device() == device &&
                  coefs->scalar_type() == at::kFloat && coefs->is_contiguous() && coefs->numel() >= 1,
              what, "rule ", rule, " projects per row and needs coefs, a contiguous float32 tensor on ", device);
  return coefs->data_ptr<float>();
}

// `t`, checked to be a contiguous tensor of `type` with at least `numel` elements on `device`.
void check_buffer(const at::Tensor& t, const char* what, const char* name, at::ScalarType type, int64_t numel,
                  const at::Device& device) {
  TORCH_CHECK(t.defined() && t.device() == device, what, name, " must be on ", device, " (the device of work)");
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.numel() >= numel, what, name,
              " must be a contiguous ", type, " tensor of >= ", numel, " elements, got ", t.scalar_type(), " ",
              t.sizes());
}

// One launch of the fused step over the tables of one plan part (backends/cuda.py). Tables in CPU
// memory (CPU parameters) run the kernel body on the host instead: see run_fused_step_on_host.
// `norm` (float64) is the global gradient norm that groups which clip read; any float64 scalar when none does.
// `reduced` (float64 [rows, reduces]) holds per-tensor sums of squares for a rule that reads them (Rule.reduces);
// any float64 scalar for another rule.
// `grad_scale` and `found_inf` (float32) are GradScaler's: the scale the gradients carry (1.0 without one) and
// whether it found an inf (0.0 without one: non-zero skips every update).
void fused_step(const at::Tensor& work, const at::Tensor& tensors, const at::Tensor& grads, const at::Tensor& groups,
                const at::Tensor& gaddr, const at::Tensor& done, const at::Tensor& norm, const at::Tensor& reduced,
                const at::Tensor& grad_scale, const at::Tensor& found_inf, int64_t n_groups, bool advance, int64_t rule,
                int64_t storage, const std::optional<at::Tensor>& coefs) {
  uf::FusedStepArgs args = checked_args(work, tensors, grads, groups, gaddr, done, n_groups, advance, rule, storage);
  const char* what = "uba_fused._C.fused_step: ";
  int tensor_cols = 0, group_cols = 0, reduces = 0;
  uf::rule_layout(static_cast<int>(rule), &tensor_cols, &group_cols, &reduces);  // known: checked_args
  check_buffer(norm, what, "norm", at::kDouble, 1, work.device());
  check_buffer(reduced, what, "reduced", at::kDouble, std::max<int64_t>(1, reduces * tensors.size(0)), work.device());
  args.reduced = reduced.data_ptr<double>();
  args.coefs = checked_coefs(coefs, what, rule, work.device());
  check_buffer(grad_scale, what, "grad_scale", at::kFloat, 1, work.device());
  check_buffer(found_inf, what, "found_inf", at::kFloat, 1, work.device());
  args.norm = norm.data_ptr<double>();
  args.grad_scale = grad_scale.data_ptr<float>();
  args.found_inf = found_inf.data_ptr<float>();
  if (work.device().is_cpu()) {
    TORCH_CHECK(uf::run_fused_step_on_host(args, static_cast<int>(rule), static_cast<int>(storage)),
                "uba_fused: fused_step on the host: unknown rule or storage");
    return;
  }
  const c10::cuda::CUDAGuard guard(work.device());
  cudaError_t err = uf::launch_fused_step(args, static_cast<int>(rule), static_cast<int>(storage),
                                          c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "uba_fused: fused_step_kernel failed: ", cudaGetErrorString(err));
}

// The pre-pass over the same tables: out[item] = the sum of squares (float64) of work item `item`'s chunk of a
// gradient (`of_param`: of the parameter as stored, 0 without a gradient: the per-tensor pre-pass of Rule.reduces).
void grad_sumsq(const at::Tensor& work, const at::Tensor& tensors, const at::Tensor& grads, const at::Tensor& groups,
                const at::Tensor& gaddr, const at::Tensor& done, const at::Tensor& out, int64_t n_groups, int64_t rule,
                int64_t storage, bool of_param) {
  uf::FusedStepArgs args = checked_args(work, tensors, grads, groups, gaddr, done, n_groups, false, rule, storage);
  args.of_param = of_param;
  check_buffer(out, "uba_fused._C.grad_sumsq: ", "out", at::kDouble, work.size(0), work.device());
  if (work.device().is_cpu()) {
    TORCH_CHECK(uf::run_grad_sumsq_on_host(args, out.data_ptr<double>(), static_cast<int>(rule),
                                           static_cast<int>(storage)),
                "uba_fused: grad_sumsq on the host: unknown rule or storage");
    return;
  }
  const c10::cuda::CUDAGuard guard(work.device());
  cudaError_t err = uf::launch_grad_sumsq(args, out.data_ptr<double>(), static_cast<int>(rule),
                                          static_cast<int>(storage), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "uba_fused: grad_sumsq_kernel failed: ", cudaGetErrorString(err));
}

// The direction pre-pass of a rule that reduces its update's direction (launch.h: launch_direction_sumsq) over the
// tables of one plan part: into `squares` (float64 [2, >= items], rows contiguous), each work item's sums of squares
// of its chunk of the parameter and of the direction, from the gradient as the update applies it (`norm`,
// `grad_scale` and `found_inf` as fused_step reads them). It writes nothing else.
void direction_sumsq(const at::Tensor& work, const at::Tensor& tensors, const at::Tensor& grads,
                     const at::Tensor& groups, const at::Tensor& gaddr, const at::Tensor& done, const at::Tensor& norm,
                     const at::Tensor& grad_scale, const at::Tensor& found_inf, const at::Tensor& squares,
                     int64_t n_groups, int64_t rule, int64_t storage, const std::optional<at::Tensor>& reduced,
                     const std::optional<at::Tensor>& coefs) {
  uf::FusedStepArgs args = checked_args(work, tensors, grads, groups, gaddr, done, n_groups, false, rule, storage);
  const char* what = "uba_fused._C.direction_sumsq: ";
  int tensor_cols = 0, group_cols = 0, reduces = 0;
  uf::rule_layout(static_cast<int>(rule), &tensor_cols, &group_cols, &reduces);  // known: checked_args
  check_buffer(norm, what, "norm", at::kDouble, 1, work.device());
  check_buffer(grad_scale, what, "grad_scale", at::kFloat, 1, work.device());
  check_buffer(found_inf, what, "found_inf", at::kFloat, 1, work.device());
  TORCH_CHECK(squares.defined() && squares.device() == work.device() && squares.scalar_type() == at::kDouble &&
                  squares.dim() == 2 && squares.size(0) == reduces && squares.size(1) >= work.size(0) &&
                  squares.stride(1) == 1,
              what, "squares must be a float64 [", reduces, ", >= ", work.size(0),
              "] tensor with contiguous rows on ", work.device());
  args.coefs = checked_coefs(coefs, what, rule, work.device());
  if (args.coefs != nullptr) {  // a rule that projects: each tensor's row length (Rows.meta)
    TORCH_CHECK(reduced.has_value(), what, "rule ", rule, " projects per row and needs reduced (its rows' meta)");
    check_buffer(*reduced, what, "reduced", at::kDouble, reduces * tensors.size(0), work.device());
    args.reduced = reduced->data_ptr<double>();
  }
  args.norm = norm.data_ptr<double>();
  args.grad_scale = grad_scale.data_ptr<float>();
  args.found_inf = found_inf.data_ptr<float>();
  args.squares = squares.data_ptr<double>();
  args.squares_stride = squares.stride(0);
  if (work.device().is_cpu()) {
    TORCH_CHECK(uf::run_direction_sumsq_on_host(args, static_cast<int>(rule), static_cast<int>(storage)),
                "uba_fused: direction_sumsq on the host: unknown storage, or rule ", rule, " has no direction");
    return;
  }
  const c10::cuda::CUDAGuard guard(work.device());
  cudaError_t err = uf::launch_direction_sumsq(args, static_cast<int>(rule), static_cast<int>(storage),
                                               c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "uba_fused: direction_sumsq_kernel failed (or rule ", rule, " has no direction): ",
              cudaGetErrorString(err));
}

// Where each parameter's gradient lives, for backends/plan.py's GradScan: one pass over every parameter,
// done here so that no Python loop visits them. scan() answers kUnchanged when every parameter has a
// dense gradient with the parameter's own sizes, strides, dtype and device at the recorded address (the
// device tables are right as they are), kMoved when that holds but some addresses changed, and kOther
// otherwise (a missing, sparse, mismatched or differently laid-out gradient: collect() then handles it).
// Both write every address to `out`; record() makes the last ones seen the reference. Both read each
// parameter's .grad, or, when given `grads`, the gradients listed there: the local shards of DTensor
// gradients (the parameters are then their local shards too), which C++ cannot reach through a DTensor.
class GradAddresses {
 public:
  enum Status : int { kUnchanged = 0, kMoved = 1, kOther = 2 };
  using GradList = std::optional<std::vector<std::optional<at::Tensor>>>;

  explicit GradAddresses(std::vector<at::Tensor> params)
      : params_(std::move(params)), ptrs_(params_.size()), seen_(params_.size()) {}

  int scan(at::Tensor& out, const GradList& grads) {
    int64_t* o = checked_out(out, grads);
    bool moved = false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor g = grad(i, grads);
      const at::Tensor& p = params_[i];
      if (!g.defined() || !own_memory(g) || g.layout() != c10::kStrided || g.sizes() != p.sizes() ||
          g.strides() != p.strides() || g.scalar_type() != p.scalar_type() || g.device() != p.device()) {
        return kOther;
      }
      o[i] = reinterpret_cast<int64_t>(g.data_ptr());
      seen_[i] = g.data_ptr();
      moved |= seen_[i] != ptrs_[i];
    }
    return moved ? kMoved : kUnchanged;
  }

  // The other path's pass, for steps scan() cannot vouch for: every gradient's address into `out`, kNoGrad
  // where there is none. Returns the index of the first gradient that is not dense and shaped, typed and
  // placed like its parameter (-1: none; the caller then says which and why), and the indices of those
  // laid out unlike their parameter (the caller walks copies of them).
  std::pair<int64_t, std::vector<int64_t>> collect(at::Tensor& out, const GradList& grads) {
    int64_t* o = checked_out(out, grads);
    std::vector<int64_t> relayout;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      const at::Tensor g = grad(i, grads);
      if (!g.defined()) {
        o[i] = uf::kNoGrad;
        seen_[i] = nullptr;
        continue;
      }
      if (!own_memory(g) || g.layout() != c10::kStrided || g.sizes() != p.sizes() ||
          g.scalar_type() != p.scalar_type() || g.device() != p.device()) {
        return {static_cast<int64_t>(i), {}};
      }
      if (g.strides() != p.strides()) relayout.push_back(static_cast<int64_t>(i));
      o[i] = reinterpret_cast<int64_t>(g.data_ptr());
      seen_[i] = g.data_ptr();
    }
    return {-1, relayout};
  }

  // What the last scan() or collect() saw becomes the reference of the next scan() (null for a missing
  // gradient: a gradient that appears there has moved).
  void record() { ptrs_ = seen_; }

  // What the device tables (and the optimizer's cached lists) were built from, for moved() to check at every
  // step: each tensor's address, dtype, device, sizes and strides, and each (dict, key, value) entry, the value
  // being the object the dict held under the key (a parameter's state buffer or step, a group's counter).
  void hold(const std::vector<at::Tensor>& tensors, const py::list& entries) {
    held_.clear();
    held_.reserve(tensors.size());
    for (const at::Tensor& t : tensors) held_.push_back({t, layout(t)});
    entries_.clear();
    entries_.reserve(entries.size());
    for (const py::handle e : entries) {
      const py::tuple entry = py::reinterpret_borrow<py::tuple>(e);
      TORCH_CHECK(entry.size() == 3 && PyDict_Check(entry[0].ptr()),
                  "uba_fused._C.GradAddresses.hold: entries must be (dict, key, value) triples");
      entries_.push_back({py::reinterpret_borrow<py::object>(entry[0]), py::reinterpret_borrow<py::object>(entry[1]),
                          py::reinterpret_borrow<py::object>(entry[2])});
    }
  }

  // Whether everything hold() recorded is as it was: no tensor moved to other memory (`p.data = ...`,
  // `model.half().float()`, `module._apply`) or changed its dtype or layout, and every dict still holds the
  // same object under its key (no state buffer, step or counter replaced). The index of the first that is
  // not, among tensors then entries (-1: all intact).
  int64_t moved() const {
    for (size_t i = 0; i < held_.size(); ++i) {
      if (!held_[i].layout.matches(held_[i].tensor)) return static_cast<int64_t>(i);
    }
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      // WithError: PyDict_GetItem saves and restores the error state around every lookup. A key that cannot be
      // hashed never gets here (it was a key of the dict when hold() ran).
      if (PyDict_GetItemWithError(e.dict.ptr(), e.key.ptr()) != e.value.ptr()) {
        return static_cast<int64_t>(held_.size() + i);
      }
    }
    return -1;
  }

  size_t size() const { return params_.size(); }

 private:
  int64_t* checked_out(at::Tensor& out, const GradList& grads) const {
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.is_contiguous() &&
                    out.numel() == static_cast<int64_t>(params_.size()),
                "uba_fused._C.GradAddresses: out must be a contiguous int64 CPU tensor of ", params_.size(),
                " values");
    TORCH_CHECK(!grads || grads->size() == params_.size(), "uba_fused._C.GradAddresses: grads must list ",
                params_.size(), " gradients (or None), got ", grads ? grads->size() : 0);
    return out.data_ptr<int64_t>();
  }

  // A tensor subclass dispatched in Python (a DTensor, say) may wrap other tensors and own no memory:
  // its address is not where its values are.
  static bool own_memory(const at::Tensor& g) { return !g.key_set().has(c10::DispatchKey::Python); }

  at::Tensor grad(size_t i, const GradList& grads) const {
    if (!grads) return params_[i].grad();
    const auto& g = (*grads)[i];
    return g ? *g : at::Tensor();
  }

  // Where a tensor's elements are and how they are laid out: what a table row derives from it.
  struct Layout {
    const void* data;
    at::ScalarType dtype;
    at::Device device;
    std::vector<int64_t> sizes, strides;
    bool matches(const at::Tensor& t) const {  // no allocation: this runs for every held tensor at every step
      return address(t) == data && t.scalar_type() == dtype && t.device() == device && t.sizes().equals(sizes) &&
             t.strides().equals(strides);
    }
  };
  struct Held {
    at::Tensor tensor;
    Layout layout;
  };
  struct Entry {
    py::object dict, key, value;
  };

  // A tensor without storage (a meta tensor, say) reads as address null.
  static const void* address(const at::Tensor& t) { return t.has_storage() ? t.data_ptr() : nullptr; }
  static Layout layout(const at::Tensor& t) {
    return {address(t), t.scalar_type(), t.device(), t.sizes().vec(), t.strides().vec()};
  }

  std::vector<at::Tensor> params_;
  std::vector<const void*> ptrs_, seen_;
  std::vector<Held> held_;
  std::vector<Entry> entries_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "uba_fused compiled kernels";
  m.def("schedule_factor", &schedule_factor, "factor(t) of a schedule for an int64 CUDA tensor of steps (device)",
        py::arg("steps"), py::arg("kind"), py::arg("warmup"), py::arg("total"), py::arg("min_ratio"),
        py::arg("phi"));
  m.def("schedule_factor_host", &schedule_factor_host, "factor(t) of a schedule, the C++ code run on the host",
        py::arg("step"), py::arg("kind"), py::arg("warmup"), py::arg("total"), py::arg("min_ratio"),
        py::arg("phi"));
  m.def("fused_step", &fused_step, "one fused optimizer step over the device tables of a plan part",
        py::arg("work"), py::arg("tensors"), py::arg("grads"), py::arg("groups"), py::arg("gaddr"), py::arg("done"),
        py::arg("norm"), py::arg("reduced"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("n_groups"),
        py::arg("advance"), py::arg("rule"), py::arg("storage"), py::arg("coefs") = py::none());
  m.def("grad_sumsq", &grad_sumsq, "the pre-pass: each work item's sum of squares of its chunk of a gradient",
        py::arg("work"), py::arg("tensors"), py::arg("grads"), py::arg("groups"), py::arg("gaddr"), py::arg("done"),
        py::arg("out"), py::arg("n_groups"), py::arg("rule"), py::arg("storage"), py::arg("of_param") = false);
  m.def("direction_sumsq", &direction_sumsq,
        "the direction pre-pass: each work item's sums of squares of its chunk of the parameter and of its update",
        py::arg("work"), py::arg("tensors"), py::arg("grads"), py::arg("groups"), py::arg("gaddr"), py::arg("done"),
        py::arg("norm"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("squares"), py::arg("n_groups"),
        py::arg("rule"), py::arg("storage"), py::arg("reduced") = py::none(), py::arg("coefs") = py::none());
  py::class_<GradAddresses>(m, "GradAddresses", "where each parameter's gradient lived at the last step")
      .def(py::init<std::vector<at::Tensor>>(), py::arg("params"))
      .def("scan", &GradAddresses::scan, "0: unchanged, 1: moved (addresses written to out), 2: other",
           py::arg("out"), py::arg("grads") = py::none())
      .def("collect", &GradAddresses::collect,
           "every address (NO_GRAD: none) into out; (first mismatched index or -1, indices laid out otherwise)",
           py::arg("out"), py::arg("grads") = py::none())
      .def("record", &GradAddresses::record, "make the addresses the last scan or collect saw the reference")
      .def("hold", &GradAddresses::hold, "record what the tables were built from: tensors, and (dict, key, value)",
           py::arg("tensors"), py::arg("entries"))
      .def("moved", &GradAddresses::moved,
           "index of the first held tensor (then entry) no longer as hold() recorded it; -1 if none")
      .def("__len__", &GradAddresses::size);
  // The registry this build was compiled from (registry.abi() as JSON): backend "cuda" compares it with
  // uba_fused/registry.py's and refuses a stale build.
  m.attr("REGISTRY") = uf::kRegistry;
}
