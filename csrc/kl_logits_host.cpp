// Argument checking, output allocation and geometry for
// `batchkl::kl_with_logits*`: everything between the dispatcher and a
// backend's row kernel.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>

#include "kl_logits.h"

namespace batchkl {
namespace {

constexpr const char* kOp = "batchkl.kl_with_logits";

Divergence divergence_for(double beta) {
  // TRL's branches: exactly 0 and exactly 1 are the two KLs, whose gradients
  // need no mixture (and which stay finite where M would be degenerate).
  if (beta == 0.0) return Divergence::kForward;
  if (beta == 1.0) return Divergence::kReverse;
  return Divergence::kJSD;
}

void check_args(const at::Tensor& input, const at::Tensor& target, double beta, double temperature,
                c10::string_view reduction, const std::optional<at::Tensor>& mask,
                const std::optional<at::Tensor>& num_items, bool probs, std::optional<at::ScalarType> out_dtype) {
  check_float(input, kOp, "input");
  check_float(target, kOp, "target");
  TORCH_CHECK(input.device() == target.device(), kOp,
              ": 'input' and 'target' must be on the same device, got input on ", input.device(),
              " and target on ", target.device());
  TORCH_CHECK_VALUE(input.dim() >= 1, kOp,
                    ": 'input' and 'target' must have at least one dimension (the distribution dim), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(input.sizes() == target.sizes(), kOp, ": 'input' and 'target' must have the same shape, got ",
                    input.sizes(), " and ", target.sizes());
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, kOp, ": argument 'beta' must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), kOp,
                    ": argument 'temperature' must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "sum" || reduction == "mean" || reduction == "batchmean", kOp,
                    ": argument 'reduction' must be one of 'none', 'sum', 'mean', 'batchmean' ('none' gives one "
                    "value per row), got '", std::string(reduction), "'");
  if (probs) {
    // The gradient w.r.t. a probability uses q_j / x_j = 1 / sum(x), which
    // only holds untempered.
    TORCH_CHECK_VALUE(temperature == 1.0, kOp, ": probs=True needs temperature=1.0, got ", temperature);
  }
  TORCH_CHECK_TYPE(!out_dtype.has_value() || at::isFloatingType(*out_dtype), kOp,
                   ": argument 'dtype' must be a floating-point dtype, got ", *out_dtype);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, kOp, ": argument 'mask' must be a bool tensor, got ",
                     m.scalar_type());
    const auto row_shape = input.sizes().slice(0, input.dim() - 1);
    TORCH_CHECK_VALUE(m.sizes() == row_shape, kOp, ": argument 'mask' must have the row shape ", row_shape,
                      " (input.shape[:-1]), got ", m.sizes());
    TORCH_CHECK(m.device() == input.device(), kOp, ": argument 'mask' must be on ", input.device(), ", got ",
                m.device());
  }
  if (num_items.has_value()) {
    const at::Tensor& n = *num_items;
    TORCH_CHECK_VALUE(n.numel() == 1 && n.dim() <= 1, kOp,
                      ": argument 'num_items_in_batch' must be a single number, got a tensor of shape ", n.sizes());
    TORCH_CHECK_TYPE(!n.is_complex() && n.scalar_type() != at::kBool, kOp,
                     ": argument 'num_items_in_batch' must be a real number, got ", n.scalar_type());
    TORCH_CHECK(n.is_cpu() || n.device() == input.device(), kOp,
                ": argument 'num_items_in_batch' must be on the CPU or on ", input.device(), ", got ", n.device());
  }
}

}  // namespace

FusedResult kl_with_logits_fused_impl(
    const at::Tensor& input_arg, const at::Tensor& target_arg, double beta, double temperature,
    c10::string_view reduction, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& num_items_in_batch, bool probs, std::optional<at::ScalarType> out_dtype,
    bool want_grad_input, bool want_grad_target, LogitsLauncher launch) {
  check_args(input_arg, target_arg, beta, temperature, reduction, mask, num_items_in_batch, probs, out_dtype);
  const Reduction red = parse_reduction(reduction);
  const c10::DeviceGuard device_guard(input_arg.device());

  // Mixed floating dtypes run in the promoted one (a copy of the narrower
  // argument; the usual case, one dtype for both, copies nothing).
  const at::ScalarType dtype = at::result_type(input_arg, target_arg);
  const at::TensorOptions opts = input_arg.options().dtype(dtype);
  std::array<at::Tensor, kNumOperands> ops;
  ops[kInput] = input_arg.to(dtype);
  ops[kTarget] = target_arg.to(dtype);
  // Owned: ops[kInput] may be replaced (and freed) below.
  const std::vector<int64_t> shape = ops[kInput].sizes().vec();
  const auto row_shape = at::IntArrayRef(shape).slice(0, shape.size() - 1);
  const int64_t rows = c10::multiply_integers(row_shape);
  const int64_t cols = shape.back();

  LogitsLaunch plan;
  plan.div = divergence_for(beta);
  plan.probs = probs;
  plan.dtype = dtype;
  plan.beta = beta;
  plan.inv_temperature = 1.0 / temperature;
  plan.want_grad_input = want_grad_input;
  plan.want_grad_target = want_grad_target;

  const bool scalar = red != Reduction::kNone || num_items_in_batch.has_value();
  // The kernel sums in float64; the result is rounded once, here.
  const at::TensorOptions out_opts = opts.dtype(out_dtype.value_or(dtype));
  at::Tensor out = scalar ? at::empty({}, opts.dtype(at::kDouble)) : at::empty(row_shape, opts.dtype(at::kDouble));
  const auto grad_or_empty = [&](bool want) { return want ? at::empty(shape, opts) : at::empty({0}, opts); };
  at::Tensor grad_input = grad_or_empty(want_grad_input);
  at::Tensor grad_target = grad_or_empty(want_grad_target);
  at::Tensor grad_scale = at::empty({0}, opts.dtype(at::kFloat));
  if (grads_of_sum(dtype) && scalar && (want_grad_input || want_grad_target)) {
    grad_scale = at::empty({}, opts.dtype(at::kFloat));
    plan.grad_scale_out = grad_scale.data_ptr<float>();
  }

  at::Tensor mask_rows, num_items;
  if (mask.has_value()) {
    mask_rows = mask->reshape({rows}).contiguous();
    plan.mask = mask_rows.const_data_ptr<bool>();
  }
  if (num_items_in_batch.has_value() && num_items_in_batch->is_cpu()) {
    // A CPU number (a Python int through the front doors) is read here: a
    // copy to the GPU would make the host wait for the stream.
    plan.divisor = num_items_in_batch->item<double>();
  } else if (num_items_in_batch.has_value()) {
    // On the device: the kernel reads it there, no host sync.
    num_items = num_items_in_batch->to(at::kDouble).reshape({});
    plan.num_items = num_items.const_data_ptr<double>();
  } else if (red == Reduction::kMean) {
    plan.divisor = static_cast<double>(cols) * (mask.has_value() ? 1.0 : static_cast<double>(rows));
    plan.divide_by_kept_rows = mask.has_value();
  } else if (red == Reduction::kBatchMean) {
    // F.kl_div's batchmean divides by input.size(0); with a mask, TRL divides
    // by the number of kept rows.
    plan.divisor = mask.has_value() ? 1.0 : static_cast<double>(shape[0]);
    plan.divide_by_kept_rows = mask.has_value();
  }

  if (rows * cols == 0) {
    // No element to sum: per-row zeros; 0 / divisor for the scalar (0 / 0 =
    // NaN for 'mean' of nothing and for 'batchmean' of zero rows, as PyTorch).
    if (scalar) {
      double divisor = plan.divisor;
      if (plan.divide_by_kept_rows) divisor *= std::max<int64_t>(1, mask_rows.sum().item<int64_t>());
      out.fill_(0.0 / divisor);
      if (num_items.defined()) out.div_(num_items);
    } else {
      out.zero_();
    }
    grad_input.zero_();
    grad_target.zero_();
    grad_scale.fill_(1.0);  // (no gradient element to scale)
    return {out.to(out_opts.dtype()), grad_input, grad_target, grad_scale};
  }

  if (want_grad_input) ops[kGradInput] = grad_input;
  if (want_grad_target) ops[kGradTarget] = grad_target;
  // The kernels read a row as cols contiguous elements, starting anywhere
  // (leading strides are free: sliced batches, shifted sequences); a
  // strided last dim is gathered per row by the backend, never copied whole.
  if (!build_geometry(plan.geo, ops, shape, /*elementwise=*/false, kInput)) {
    ops[kInput] = ops[kInput].contiguous();
    ops[kTarget] = ops[kTarget].contiguous();
    TORCH_CHECK(build_geometry(plan.geo, ops, shape, /*elementwise=*/false, kInput), kOp,
                ": internal error: could not lay out a tensor of shape ", shape);
  }
  // build_geometry's column stride is 0 for a single column.
  for (int k = 0; k < kNumOperands; ++k) {
    plan.ptr[k] = ops[k].defined() ? ops[k].data_ptr() : nullptr;
    if (plan.geo.cols == 1) plan.geo.col_stride[k] = 1;
  }
  (scalar ? plan.scalar_out : plan.row_out) = out.data_ptr<double>();
  launch(plan);
  return {out.to(out_opts.dtype()), grad_input, grad_target, grad_scale};
}

// Devices without a kernel get an error naming the device instead of the
// dispatcher's generic "could not run".
TORCH_LIBRARY_IMPL(batchkl, CompositeExplicitAutograd, m) {
  m.impl("kl_with_logits", [](const at::Tensor& input, const at::Tensor&, double, double, c10::string_view,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                              std::optional<at::ScalarType>) -> at::Tensor { unsupported_device(kOp, input); });
  m.impl("kl_with_logits_fused",
         [](const at::Tensor& input, const at::Tensor&, double, double, c10::string_view,
            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool, bool,
            std::optional<at::ScalarType>) -> FusedResult {
           unsupported_device(kOp, input);
         });
}

}  // namespace batchkl
