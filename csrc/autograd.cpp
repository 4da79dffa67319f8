// Autograd for `batchkl::kl`, registered in C++ at the Autograd key
// (torchvision's pattern) so libtorch users get gradients too. The forward
// calls `kl_fused`, which writes the loss and the (pre-scaled) gradients in one
// launch; the backward only multiplies by grad_output.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "kl.h"

namespace batchkl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Sums a gradient computed in the broadcast shape down to an argument's shape
// and dtype (SymInt-aware, so AOTAutograd can trace it with dynamic shapes).
at::Tensor reduce_to(const at::Tensor& grad, const c10::IValue& sizes, const c10::IValue& dtype) {
  if (!grad.defined()) return grad;
  return at::sum_to(grad, sizes.toSymIntVector()).to(static_cast<at::ScalarType>(dtype.toInt()));
}

class KLFunction : public torch::autograd::Function<KLFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               const std::string& reduction, bool log_target) {
    const bool none = parse_reduction(reduction) == Reduction::kNone;
    const bool want_input = input.requires_grad();
    const bool want_target = target.requires_grad();
    ctx->saved_data["none"] = none;
    ctx->saved_data["row"] = parse_reduction(reduction) == Reduction::kRow;
    ctx->saved_data["log_target"] = log_target;
    ctx->saved_data["input_sizes"] = input.sym_sizes();
    ctx->saved_data["target_sizes"] = target.sym_sizes();
    ctx->saved_data["input_dtype"] = static_cast<int64_t>(input.scalar_type());
    ctx->saved_data["target_dtype"] = static_cast<int64_t>(target.scalar_type());

    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("batchkl::kl_fused", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, c10::string_view, bool, bool, bool)>();
    // 'none' has a full grad_output, so there is nothing to pre-compute: its
    // backward is a single elementwise pass (kl_none_backward).
    auto [loss, grad_input, grad_target] =
        op.call(input, target, reduction, log_target, want_input && !none, want_target && !none);
    if (none) {
      ctx->save_for_backward({input, target});
    } else {
      ctx->save_for_backward({grad_input, grad_target});
    }
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& g = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_target = ctx->needs_input_grad(1);
    at::Tensor grad_input, grad_target;
    if (ctx->saved_data["none"].toBool()) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("batchkl::kl_none_backward", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, bool, bool, bool)>();
      std::tie(grad_input, grad_target) =
          op.call(g, saved[0], saved[1], ctx->saved_data["log_target"].toBool(), want_input, want_target);
    } else {
      // 'row': one grad_output per row, broadcast along the distribution dim.
      const auto scale = ctx->saved_data["row"].toBool() ? g.unsqueeze(-1) : g;
      if (want_input) grad_input = saved[0] * scale;
      if (want_target) grad_target = saved[1] * scale;
    }
    return {want_input ? reduce_to(grad_input, ctx->saved_data["input_sizes"], ctx->saved_data["input_dtype"])
                       : at::Tensor(),
            want_target ? reduce_to(grad_target, ctx->saved_data["target_sizes"], ctx->saved_data["target_dtype"])
                        : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor kl_autograd(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                       bool log_target) {
  return KLFunction::apply(input, target, std::string(reduction), log_target)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, Autograd, m) { m.impl("kl", kl_autograd); }

}  // namespace batchkl
