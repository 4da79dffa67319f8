// Argument checking, broadcasting, output allocation and geometry for
// `batchkl::kl*`: everything between the dispatcher and a backend's loop, so
// the CPU and CUDA backends only run kernels.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "kl.h"

namespace batchkl {

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": argument '", name, "' is an undefined tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   op, ": argument '", name,
                   "' must have a floating-point dtype (float32, float64, float16 or bfloat16), got ",
                   t.scalar_type());
}

// Devices other than CPU and CUDA never reach the argument checks: they have
// no backend kernel and land in the catch-alls (CompositeExplicitAutograd).
void unsupported_device(const char* op, const at::Tensor& t) {
#ifdef BATCHKL_WITH_CUDA
  TORCH_CHECK(false, op, ": only CPU and CUDA tensors are supported, got tensors on ", t.device());
#else
  TORCH_CHECK(false, op, ": only CPU tensors are supported (this build of batchkl has no CUDA kernels), got tensors on ",
              t.device());
#endif
}

namespace {

void check_pair(const at::Tensor& input, const at::Tensor& target) {
  check_float(input, "batchkl.kl", "input");
  check_float(target, "batchkl.kl", "target");
  TORCH_CHECK(input.device() == target.device(),
              "batchkl.kl: 'input' and 'target' must be on the same device, got input on ", input.device(),
              " and target on ", target.device());
}

std::vector<int64_t> broadcast_shape(const at::Tensor& input, const at::Tensor& target) {
  const auto a = input.sizes(), b = target.sizes();
  const size_t ndim = std::max(a.size(), b.size());
  std::vector<int64_t> shape(ndim);
  for (size_t i = 0; i < ndim; ++i) {
    const int64_t da = i < ndim - a.size() ? 1 : a[i - (ndim - a.size())];
    const int64_t db = i < ndim - b.size() ? 1 : b[i - (ndim - b.size())];
    TORCH_CHECK_VALUE(da == db || da == 1 || db == 1, "batchkl.kl: 'input' of shape ", a, " and 'target' of shape ", b,
                      " do not broadcast: dim ", static_cast<int64_t>(i) - static_cast<int64_t>(ndim), " is ", da,
                      " in input and ", db, " in target");
    shape[i] = da == 1 ? db : da;
  }
  return shape;
}

// Output of reduction='none' laid out as F.kl_div lays out its result:
// TensorIterator's choice for (target, input) in that order, since PyTorch's
// formula starts from the target (xlogy(t, t) - t * x, exp(t) * (t - x)), so
// a transposed target gives a transposed output. The fake kernel mirrors this
// with `torch.empty_like(target + input)`.
at::Tensor empty_like_elementwise(const at::Tensor& input, const at::Tensor& target, at::ScalarType dtype) {
  auto iter = at::TensorIteratorConfig()
                  .add_owned_output(at::Tensor())
                  .add_const_input(target)
                  .add_const_input(input)
                  .check_all_same_dtype(false)
                  .declare_static_dtype(dtype)
                  .build();
  return iter.output();
}

struct Dim {
  int64_t size;
  std::array<int64_t, kNumOperands> stride;
};

bool mergeable(const Dim& outer, const Dim& inner) {
  for (int k = 0; k < kNumOperands; ++k) {
    if (outer.stride[k] != inner.stride[k] * inner.size) return false;
  }
  return true;
}

// What both entry points start from: the arguments promoted to one dtype
// and expanded (not copied) to the broadcast shape.
struct Operands {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  at::TensorOptions opts;
  std::array<at::Tensor, kNumOperands> ops;
};

Operands promote_and_broadcast(const at::Tensor& input, const at::Tensor& target) {
  Operands o;
  o.dtype = at::result_type(input, target);
  o.shape = broadcast_shape(input, target);
  o.opts = input.options().dtype(o.dtype);
  o.ops[kInput] = input.to(o.dtype).expand(o.shape);
  o.ops[kTarget] = target.to(o.dtype).expand(o.shape);
  return o;
}

}  // namespace

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "batchmean") return Reduction::kBatchMean;
  if (reduction == "row") return Reduction::kRow;
  TORCH_CHECK_VALUE(false, "batchkl.kl: argument 'reduction' must be one of 'none', 'sum', 'mean', 'batchmean', "
                           "'row', got '", std::string(reduction), "'");
}

int64_t chunk_for(int64_t cols) {
  // About 8k columns per tile: long enough to stream at full bandwidth, short
  // enough that a few long rows still spread over every core / SM. Rounded to
  // 64 elements so every tile of an aligned row starts 16-byte aligned.
  constexpr int64_t kTarget = 8192;
  if (cols <= kTarget) return std::max<int64_t>(cols, 1);
  const int64_t tiles = (cols + kTarget - 1) / kTarget;
  const int64_t chunk = (cols + tiles - 1) / tiles;
  return (chunk + 63) / 64 * 64;
}

bool build_geometry(RowGeometry& geo, const std::array<at::Tensor, kNumOperands>& ops, at::IntArrayRef shape,
                    bool elementwise, int layout_operand) {
  const int64_t ndim = static_cast<int64_t>(shape.size());
  std::vector<Dim> dims(ndim);
  for (const auto d : c10::irange(ndim)) {
    dims[d].size = shape[d];
    for (int k = 0; k < kNumOperands; ++k) {
      dims[d].stride[k] = ops[k].defined() ? ops[k].stride(d) : 0;
    }
  }
  Dim col{1, {}};
  if (elementwise) {
    // Elementwise work may visit elements in any order: follow the memory
    // order of the leading operand so that its innermost dim is the column.
    std::vector<Dim> kept;
    for (auto& d : dims) {
      if (d.size != 1) kept.push_back(d);
    }
    std::stable_sort(kept.begin(), kept.end(), [&](const Dim& a, const Dim& b) {
      return a.stride[layout_operand] > b.stride[layout_operand];
    });
    dims = kept;
    if (!dims.empty()) {
      col = dims.back();
      dims.pop_back();
      while (!dims.empty() && mergeable(dims.back(), col)) {
        col.size *= dims.back().size;
        dims.pop_back();
      }
    }
  } else if (ndim > 0) {
    col = dims.back();
    dims.pop_back();
  }
  // Coalesce the leading dims, innermost last.
  std::vector<Dim> lead;
  for (auto& d : dims) {
    if (d.size == 1) continue;
    if (!lead.empty() && mergeable(lead.back(), d)) {
      lead.back().size *= d.size;
      lead.back().stride = d.stride;
    } else {
      lead.push_back(d);
    }
  }
  if (static_cast<int>(lead.size()) > kMaxLeadDims) return false;
  geo.cols = col.size;
  for (int k = 0; k < kNumOperands; ++k) geo.col_stride[k] = col.size == 1 ? 0 : col.stride[k];
  geo.nlead = static_cast<int>(lead.size());
  geo.rows = 1;
  for (int d = 0; d < geo.nlead; ++d) {
    geo.lead_sizes[d] = lead[d].size;
    geo.rows *= lead[d].size;
    for (int k = 0; k < kNumOperands; ++k) geo.lead_strides[k][d] = lead[d].stride[k];
  }
  geo.chunk = chunk_for(geo.cols);
  geo.chunks_per_row = (geo.cols + geo.chunk - 1) / geo.chunk;
  return true;
}

namespace {

// Plans and runs one kernel call over operands that all have `shape`.
void run(KLLaunch& plan, std::array<at::Tensor, kNumOperands>& ops, at::IntArrayRef shape, Launcher launch) {
  const bool elementwise = plan.mode != Mode::kReduce;
  // The dims are ordered by the memory layout of an output we allocated
  // densely (grad_output may be an expanded view with zero strides).
  const int layout = plan.mode == Mode::kElementwise ? kOut : (plan.want_grad_input ? kGradInput : kGradTarget);
  if (!build_geometry(plan.geo, ops, shape, elementwise, layout)) {
    // Too many non-mergeable dims for the offset calculator: copy the inputs
    // into the layout of the outputs (dense, allocated by us), after which
    // every operand coalesces into a plain rows x cols walk.
    const at::Tensor like = elementwise ? ops[layout] : at::Tensor();
    for (int k : {kInput, kTarget, kOut}) {
      if (k == kOut && plan.mode != Mode::kBackward) continue;  // an output, already dense
      ops[k] = like.defined() ? at::empty_like(like).copy_(ops[k]) : ops[k].contiguous();
    }
    TORCH_CHECK(build_geometry(plan.geo, ops, shape, elementwise, layout),
                "batchkl.kl: internal error: could not lay out a tensor of shape ", shape);
  }
  for (int k = 0; k < kNumOperands; ++k) plan.ptr[k] = ops[k].defined() ? ops[k].data_ptr() : nullptr;
  launch(plan);
}

}  // namespace

FusedResult kl_fused_impl(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                          bool log_target, bool want_grad_input, bool want_grad_target, Launcher launch) {
  check_pair(input, target);
  const c10::DeviceGuard device_guard(input.device());
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(red != Reduction::kRow || std::max(input.dim(), target.dim()) >= 1,
                    "batchkl.kl: reduction='row' needs tensors with at least one dimension (the distribution "
                    "dim), got input of shape ", input.sizes(), " and target of shape ", target.sizes());
  auto [dtype, shape, opts, ops] = promote_and_broadcast(input, target);
  const int64_t numel = c10::multiply_integers(shape);

  KLLaunch plan;
  plan.reduction = red;
  plan.log_target = log_target;
  plan.dtype = dtype;

  if (red == Reduction::kNone) {
    plan.mode = Mode::kElementwise;
    ops[kOut] = empty_like_elementwise(input, target, dtype);
    if (numel > 0) run(plan, ops, shape, launch);
    return {ops[kOut], at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts.dtype(at::kFloat))};
  }

  plan.mode = Mode::kReduce;
  plan.want_grad_input = want_grad_input;
  plan.want_grad_target = want_grad_target;
  if (red == Reduction::kMean) plan.divisor = static_cast<double>(numel);
  if (red == Reduction::kBatchMean && input.dim() > 0) plan.divisor = static_cast<double>(input.size(0));
  at::Tensor grad_scale = at::empty({0}, opts.dtype(at::kFloat));
  plan.grad_divisor = plan.divisor;
  if (grads_of_sum(dtype) && red != Reduction::kRow && (want_grad_input || want_grad_target)) {
    plan.grad_divisor = 1.0;
    grad_scale = at::full({}, 1.0 / plan.divisor, opts.dtype(at::kFloat));
  }
  // Gradients are dense in the broadcast shape; autograd sums them down to
  // each argument's own shape.
  const auto grad_or_empty = [&](bool want) { return want ? at::empty(shape, opts) : at::empty({0}, opts); };
  at::Tensor grad_input = grad_or_empty(want_grad_input);
  at::Tensor grad_target = grad_or_empty(want_grad_target);
  at::Tensor out;
  if (red == Reduction::kRow) {
    out = at::empty(at::IntArrayRef(shape).slice(0, shape.size() - 1), opts);
  } else {
    out = at::empty({}, opts);
  }
  if (numel == 0) {
    // Nothing to sum: 0 for sum/row, 0 / 0 = NaN for mean (as PyTorch).
    out.fill_(red == Reduction::kRow ? 0.0 : 0.0 / plan.divisor);
    grad_input.zero_();
    grad_target.zero_();
    return {out, grad_input, grad_target, grad_scale};
  }
  if (want_grad_input) ops[kGradInput] = grad_input;
  if (want_grad_target) ops[kGradTarget] = grad_target;
  (red == Reduction::kRow ? plan.row_out : plan.scalar_out) = out.data_ptr();
  run(plan, ops, shape, launch);
  return {out, grad_input, grad_target, grad_scale};
}

std::tuple<at::Tensor, at::Tensor> kl_none_backward_impl(const at::Tensor& grad, const at::Tensor& input,
                                                         const at::Tensor& target, bool log_target,
                                                         bool want_grad_input, bool want_grad_target,
                                                         Launcher launch) {
  check_pair(input, target);
  check_float(grad, "batchkl.kl", "grad");
  const c10::DeviceGuard device_guard(input.device());
  auto [dtype, shape, opts, ops] = promote_and_broadcast(input, target);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(shape), "batchkl.kl: 'grad' must have the broadcast shape ",
                    shape, ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == input.device(), "batchkl.kl: 'grad' must be on ", input.device(), ", got ",
              grad.device());
  KLLaunch plan;
  plan.mode = Mode::kBackward;
  plan.log_target = log_target;
  plan.dtype = dtype;
  plan.want_grad_input = want_grad_input;
  plan.want_grad_target = want_grad_target;
  ops[kOut] = grad.to(dtype);
  // Gradients follow grad_output's layout, as PyTorch's elementwise backward does.
  const auto grad_or_empty = [&](bool want) {
    return want ? at::empty_like(ops[kOut], at::MemoryFormat::Preserve) : at::empty({0}, opts);
  };
  at::Tensor grad_input = grad_or_empty(want_grad_input);
  at::Tensor grad_target = grad_or_empty(want_grad_target);
  if (want_grad_input) ops[kGradInput] = grad_input;
  if (want_grad_target) ops[kGradTarget] = grad_target;
  if (c10::multiply_integers(shape) > 0 && (want_grad_input || want_grad_target)) run(plan, ops, shape, launch);
  return {grad_input, grad_target};
}

void kl_scale_impl(at::Tensor& grad, const at::Tensor& scale, Scaler scaler) {
  if (grad.numel() == 0) return;  // nothing to scale (also: no rows to count when the last dim is 0)
  TORCH_CHECK(grad.is_contiguous(), "batchkl.kl_scale_: 'grad' must be contiguous, got sizes ", grad.sizes(),
              " and strides ", grad.strides());
  TORCH_CHECK(grad.device() == scale.device(), "batchkl.kl_scale_: 'scale' must be on ", grad.device(), ", got ",
              scale.device());
  const int64_t rows = grad.dim() == 0 ? 1 : grad.numel() / std::max<int64_t>(grad.size(-1), 1);
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == rows, "batchkl.kl_scale_: 'scale' must have 1 or ", rows,
              " elements, got ", scale.numel());
  const c10::DeviceGuard device_guard(grad.device());
  // Both scalers multiply in the gradient's math type (float32 for 16-bit),
  // so the product is rounded once, and a float16 gradient of the sum meets
  // its small float32 scale (grads_of_sum) unrounded. They read the scale in
  // that type or in the gradient's own, the usual grad_output, which then
  // needs no conversion (on CUDA: no second launch in a backward).
  const auto same = scale.scalar_type() == grad.scalar_type();
  scaler(grad, scale.to(same ? grad.scalar_type() : at::toOpMathType(grad.scalar_type())).contiguous());
}

// Every backend without a kernel of its own (XPU, MPS, PrivateUse1, ...) lands
// here and gets an error naming its device instead of the dispatcher's
// generic "could not run" about an internal op. Meta has its own (fake) kernel.
TORCH_LIBRARY_IMPL(batchkl, CompositeExplicitAutograd, m) {
  m.impl("kl", [](const at::Tensor& input, const at::Tensor&, c10::string_view, bool) -> at::Tensor {
    unsupported_device("batchkl.kl", input);
  });
  m.impl("kl_fused", [](const at::Tensor& input, const at::Tensor&, c10::string_view, bool, bool,
                        bool) -> FusedResult { unsupported_device("batchkl.kl", input); });
  m.impl("kl_none_backward", [](const at::Tensor&, const at::Tensor& input, const at::Tensor&, bool, bool,
                                bool) -> std::tuple<at::Tensor, at::Tensor> { unsupported_device("batchkl.kl", input); });
  m.impl("kl_scale_", [](at::Tensor& grad, const at::Tensor&) { unsupported_device("batchkl.kl", grad); });
}

}  // namespace batchkl
