// Autograd for `batchkl::kl`, registered in C++ at the Autograd key
// (torchvision's pattern) so libtorch users get gradients too. The forward
// calls `kl_fused`, which writes the loss and the (pre-scaled) gradients in one
// launch; the backward only multiplies by grad_output.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
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

// The saved gradients are private to this node, so when the graph is freed
// after this backward (no retain_graph) they can be scaled in place: no new
// N x V allocation, and on CUDA no pass at all when grad_output is 1. Not
// while tracing (fake / functional tensors, Python modes): there the
// out-of-place product is what the compiler should see.
bool scale_in_place_ok(const at::Tensor& saved_grad, const at::Tensor& g) {
  if (torch::autograd::get_current_graph_task_keep_graph()) return false;
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python)) return false;
  for (const auto* t : {&saved_grad, &g}) {
    if (!(t->is_cpu() || t->is_cuda()) || t->layout() != at::kStrided) return false;
    if (t->unsafeGetTensorImpl()->is_python_dispatch() || at::functionalization::impl::isFunctionalTensor(*t)) {
      return false;
    }
    const auto keys = t->key_set();
    if (keys.has(c10::DispatchKey::FuncTorchGradWrapper) || keys.has(c10::DispatchKey::FuncTorchBatched)) {
      return false;
    }
  }
  return saved_grad.is_contiguous() && g.dtype() == saved_grad.dtype();
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
      const bool row = ctx->saved_data["row"].toBool();
      const auto scale_saved = [&](const at::Tensor& saved_grad) -> at::Tensor {
        if (scale_in_place_ok(saved_grad, g)) {
          static auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("batchkl::kl_scale_", "")
                               .typed<void(at::Tensor&, const at::Tensor&)>();
          at::Tensor grad = saved_grad;
          op.call(grad, g);
          return grad;
        }
        return saved_grad * (row ? g.unsqueeze(-1) : g);
      };
      if (want_input) grad_input = scale_saved(saved[0]);
      if (want_target) grad_target = scale_saved(saved[1]);
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
