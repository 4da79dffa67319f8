// Autograd for `batchkl::kl`, registered in C++ at the Autograd key
// (torchvision's pattern) so libtorch users get gradients too. The forward
// calls `kl_fused`, which writes the loss and the (pre-scaled) gradients in one
// launch; the backward only multiplies by grad_output.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/SavedTensorHooks.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "include/batchkl/batchkl.h"
#include "kl.h"
#include "kl_logits.h"

namespace batchkl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What a backward needs to know of the two arguments besides the saved
// gradients: their shapes and dtypes, and whether saved-tensor hooks ran.
void save_arguments(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target) {
  ctx->saved_data["hooked"] = at::SavedTensorDefaultHooks::get_hooks().has_value();
  ctx->saved_data["input_sizes"] = input.sym_sizes();
  ctx->saved_data["target_sizes"] = target.sym_sizes();
  ctx->saved_data["input_dtype"] = static_cast<int64_t>(input.scalar_type());
  ctx->saved_data["target_dtype"] = static_cast<int64_t>(target.scalar_type());
}

// Sums a gradient computed in the broadcast shape down to argument `arg`'s
// ("input" or "target") shape and dtype (SymInt-aware, so AOTAutograd can
// trace it with dynamic shapes), over the dims that at::sum_to sums.
at::Tensor reduce_to(const at::Tensor& grad, AutogradContext* ctx, const std::string& arg) {
  if (!grad.defined()) return grad;
  const auto dtype = static_cast<at::ScalarType>(ctx->saved_data[arg + "_dtype"].toInt());
  const auto shape = ctx->saved_data[arg + "_sizes"].toSymIntVector();
  const auto sizes = grad.sym_sizes();
  const int64_t leading = static_cast<int64_t>(sizes.size()) - static_cast<int64_t>(shape.size());
  std::vector<int64_t> dims;
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    if (i < leading || (shape[i - leading] == 1 && sizes[i] != 1)) dims.push_back(i);
  }
  if (dims.empty()) return grad.to(dtype);
  // The sum accumulates in float32 at least, and in the argument's dtype
  // where that is wider: thousands of float16 elements summed in float16
  // overflow (PyTorch's CPU sum of a float16 tensor keeps float16 partial
  // sums: -inf for 48600 elements whose float32 sum is -52988) or, in
  // bfloat16, lose digits; a float32 0-d target (which does not promote the
  // result) broadcast against float16 input gets its gradient summed in
  // float32. at::sum's dtype takes no float32 copy of the gradient.
  const auto acc = at::promote_types(at::promote_types(grad.scalar_type(), dtype), at::kFloat);
  auto summed = at::sum(grad, dims, /*keepdim=*/true, acc);
  if (leading > 0) summed = summed.view_symint(shape);
  return summed.to(dtype);
}

// The saved gradients are private to this node, so when the graph is freed
// after this backward (no retain_graph) they can be scaled in place: no new
// N x V allocation, and on CUDA no pass at all when grad_output is 1. Not
// when saved-tensor hooks saw them at forward time (a pack hook may have kept
// a reference), and not while tracing (fake / functional tensors, Python
// modes): there the out-of-place product is what the compiler should see.
bool scale_in_place_ok(const at::Tensor& saved_grad, const at::Tensor& g, bool hooked) {
  if (hooked || torch::autograd::get_current_graph_task_keep_graph()) return false;
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
  // A scale of another dtype (a float32 loss of 16-bit logits under
  // autocast, a float16 gradient's float32 factor) is fine: the scalers
  // multiply in float32 and round once, as the out-of-place product would.
  return saved_grad.is_contiguous();
}

// Backward of a fused op: the gradient its forward wrote, times grad_output
// `g` (a scalar, or one value per row when `per_row`) and, where the forward
// gave one, its `grad_scale` (float16 gradients of the sum: 1 / divisor, see
// grads_of_sum), multiplied in float32 first, so that neither that small
// factor nor its product with a GradScaler's large grad_output is rounded to
// float16 before it meets the gradient. In place when that is safe
// (scale_in_place_ok), which costs no pass over the gradient when the scale
// is 1.
at::Tensor scale_fused_grad(const at::Tensor& saved_grad, const at::Tensor& g, bool per_row, bool hooked,
                            const at::Tensor& grad_scale) {
  const bool factor = grad_scale.numel() != 0;
  const at::Tensor scale = factor ? g.to(grad_scale.scalar_type()) * grad_scale : g;
  if (scale_in_place_ok(saved_grad, scale, hooked)) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("batchkl::kl_scale_", "")
                         .typed<void(at::Tensor&, const at::Tensor&)>();
    at::Tensor grad = saved_grad;
    op.call(grad, scale);
    return grad;
  }
  const at::Tensor s = per_row ? scale.unsqueeze(-1) : scale;
  // (A float16 tensor times a float32 0-d tensor on its device would round
  // the factor to float16 first.)
  return factor ? (saved_grad.to(s.scalar_type()) * s).to(saved_grad.scalar_type()) : saved_grad * s;
}

// Nodes are held by std::shared_ptr in older torch, c10::intrusive_ptr in
// newer; a template so that only the matching branch is compiled.
template <typename NodePtr = decltype(std::declval<torch::autograd::Edge>().function)>
NodePtr make_error_node(const char* msg, torch::autograd::edge_list edges) {
  using torch::autograd::Error;
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<Error>(msg, std::move(edges));
  } else {
    return c10::make_intrusive<Error>(msg, std::move(edges));
  }
}

// Second derivatives are not implemented (the first ones come out of the
// fused kernel, not out of differentiable ops). With create_graph=True each
// returned gradient gets a node that raises when differentiated. The node
// hangs from the op's own edges (to its arguments) and grad_output's, as
// PyTorch's NotImplemented nodes do, so it lies on every path from the
// gradient to what the gradient depends on, and torch.autograd.grad runs it
// whatever it is asked for. A node without edges (the kind Python's
// @once_differentiable makes) was skipped wherever other terms gave grad
// something to differentiate: the derivative of a gradient penalty
// |dL/dx|^2 + f(x) came back as f's alone.
template <class F>
std::pair<at::Tensor, at::Tensor> once_differentiable(AutogradContext* ctx, const at::Tensor& g, at::Tensor grad_input,
                                                      at::Tensor grad_target, const char* msg) {
  if (!at::GradMode::is_enabled()) return {grad_input, grad_target};
  torch::autograd::edge_list edges;
  // The engine's current node is this op's, unless backward runs outside the
  // engine; then only grad_output's edge is known.
  const auto node = torch::autograd::get_current_node();
  const auto* self = dynamic_cast<const torch::autograd::CppNode<F>*>(node.get());
  if (self != nullptr && &self->ctx_ == ctx) edges = self->next_edges();
  for (auto& edge : torch::autograd::collect_next_edges(g)) edges.push_back(std::move(edge));
  for (auto* grad : {&grad_input, &grad_target}) {
    if (!grad->defined()) continue;
    *grad = grad->detach();
    torch::autograd::set_history(*grad, make_error_node(msg, edges));
  }
  return {grad_input, grad_target};
}

// Forward-mode AD has no formula here: a tangent on an argument is an error.
// Without this check the result came back with no tangent, as if it did not
// depend on the argument (which is what torch.library's Python custom ops
// with a registered autograd still do, torch 2.14).
void check_no_tangent(const char* op, const at::Tensor& input, const at::Tensor& target) {
  for (const auto& [name, arg] : {std::pair<const char*, const at::Tensor*>{"input", &input}, {"target", &target}}) {
    TORCH_CHECK(!arg->_fw_grad(/*level=*/0).defined(), op,
                ": forward-mode AD (torch.autograd.forward_ad) is not supported: argument '", name,
                "' has a tangent. Use reverse mode (backward), or a composite of PyTorch ops where forward-mode "
                "derivatives are needed.");
  }
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
    save_arguments(ctx, input, target);

    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("batchkl::kl_fused", "")
                         .typed<FusedResult(const at::Tensor&, const at::Tensor&, c10::string_view, bool, bool,
                                            bool)>();
    // 'none' has a full grad_output, so there is nothing to pre-compute: its
    // backward is a single elementwise pass (kl_none_backward).
    auto [loss, grad_input, grad_target, grad_scale] =
        op.call(input, target, reduction, log_target, want_input && !none, want_target && !none);
    if (none) {
      ctx->save_for_backward({input, target});
    } else {
      ctx->save_for_backward({grad_input, grad_target, grad_scale});
    }
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& g = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_target = ctx->needs_input_grad(1);
    at::Tensor grad_input, grad_target;
    // Below autograd: these products are first derivatives only (see once_differentiable).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
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
      const bool hooked = ctx->saved_data["hooked"].toBool();
      const auto scale_saved = [&](const at::Tensor& saved_grad) {
        return scale_fused_grad(saved_grad, g, row, hooked, saved[2]);
      };
      if (want_input) grad_input = scale_saved(saved[0]);
      if (want_target) grad_target = scale_saved(saved[1]);
    }
    // (kl_none_backward returns an empty tensor for a gradient not asked for.)
    grad_input = want_input ? reduce_to(grad_input, ctx, "input") : at::Tensor();
    grad_target = want_target ? reduce_to(grad_target, ctx, "target") : at::Tensor();
    constexpr const char* msg =
        "batchkl.kl: second derivatives (double backward) are not supported: its gradients come out of the fused "
        "forward kernel. Use torch.nn.functional.kl_div where higher-order gradients are needed.";
    std::tie(grad_input, grad_target) = once_differentiable<KLFunction>(ctx, g, grad_input, grad_target, msg);
    return {grad_input, grad_target, at::Tensor(), at::Tensor()};
  }
};

at::Tensor kl_autograd(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                       bool log_target) {
  check_no_tangent("batchkl.kl", input, target);
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || target.requires_grad())) {
    // Nothing will be differentiated: the loss alone, no gradients written.
    at::AutoDispatchBelowADInplaceOrView guard;
    return kl(input, target, reduction, log_target);
  }
  return KLFunction::apply(input, target, std::string(reduction), log_target)[0];
}


class KLWithLogitsFunction : public torch::autograd::Function<KLWithLogitsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target, double beta,
                               double temperature, const std::string& reduction,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& num_items,
                               bool probs, std::optional<at::ScalarType> dtype) {
    ctx->saved_data["per_row"] = reduction == "none" && !num_items.has_value();
    save_arguments(ctx, input, target);
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("batchkl::kl_with_logits_fused", "")
                         .typed<FusedResult(const at::Tensor&, const at::Tensor&, double, double, c10::string_view,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                                            bool, bool, std::optional<at::ScalarType>)>();
    auto [loss, grad_input, grad_target, grad_scale] = op.call(
        input, target, beta, temperature, reduction, mask, num_items, probs, input.requires_grad(),
        target.requires_grad(), dtype);
    ctx->save_for_backward({grad_input, grad_target, grad_scale});
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& g = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const bool per_row = ctx->saved_data["per_row"].toBool();
    const bool hooked = ctx->saved_data["hooked"].toBool();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    constexpr const char* msg =
        "batchkl.kl_with_logits: second derivatives (double backward) are not supported: its gradients come out of "
        "the fused forward kernel.";
    at::Tensor grad_input, grad_target;
    // (The shapes match; reduce_to only casts back from a promoted dtype.)
    if (ctx->needs_input_grad(0)) {
      grad_input = reduce_to(scale_fused_grad(saved[0], g, per_row, hooked, saved[2]), ctx, "input");
    }
    if (ctx->needs_input_grad(1)) {
      grad_target = reduce_to(scale_fused_grad(saved[1], g, per_row, hooked, saved[2]), ctx, "target");
    }
    std::tie(grad_input, grad_target) =
        once_differentiable<KLWithLogitsFunction>(ctx, g, grad_input, grad_target, msg);
    return {grad_input, grad_target, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor kl_with_logits_autograd(const at::Tensor& input, const at::Tensor& target, double beta, double temperature,
                                   c10::string_view reduction, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& num_items, bool probs,
                                   std::optional<at::ScalarType> dtype) {
  check_no_tangent("batchkl.kl_with_logits", input, target);
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || target.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return kl_with_logits(input, target, beta, temperature, reduction, mask, num_items, probs, dtype);
  }
  return KLWithLogitsFunction::apply(input, target, beta, temperature, std::string(reduction), mask, num_items, probs,
                                     dtype)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, Autograd, m) {
  m.impl("kl", kl_autograd);
  m.impl("kl_with_logits", kl_with_logits_autograd);
}

}  // namespace batchkl
