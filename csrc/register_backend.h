// Binds the `batchkl::kl*` and `batchkl::kl_with_logits*` schemas to one
// backend's launchers. Included by the
// CPU and CUDA backends so both register the very same entry points.
#pragma once

#include <torch/library.h>

#include "kl.h"
#include "kl_logits.h"

namespace batchkl {

template <Launcher kLaunch, Scaler kScale>
void register_backend(torch::Library& m) {
  m.impl("kl", [](const at::Tensor& input, const at::Tensor& target, c10::string_view reduction, bool log_target) {
    return std::get<0>(kl_fused_impl(input, target, reduction, log_target, false, false, kLaunch));
  });
  m.impl("kl_fused", [](const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                        bool log_target, bool grad_input, bool grad_target) {
    return kl_fused_impl(input, target, reduction, log_target, grad_input, grad_target, kLaunch);
  });
  m.impl("kl_none_backward", [](const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                                bool log_target, bool grad_input, bool grad_target) {
    return kl_none_backward_impl(grad, input, target, log_target, grad_input, grad_target, kLaunch);
  });
  m.impl("kl_scale_", [](at::Tensor& grad, const at::Tensor& scale) { kl_scale_impl(grad, scale, kScale); });
}

template <LogitsLauncher kLaunch>
void register_logits_backend(torch::Library& m) {
  m.impl("kl_with_logits", [](const at::Tensor& input, const at::Tensor& target, double beta, double temperature,
                              c10::string_view reduction, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& num_items, bool probs,
                              std::optional<at::ScalarType> dtype) {
    return std::get<0>(kl_with_logits_fused_impl(input, target, beta, temperature, reduction, mask, num_items, probs,
                                                 dtype, false, false, kLaunch));
  });
  m.impl("kl_with_logits_fused",
         [](const at::Tensor& input, const at::Tensor& target, double beta, double temperature,
            c10::string_view reduction, const std::optional<at::Tensor>& mask,
            const std::optional<at::Tensor>& num_items, bool probs, bool grad_input, bool grad_target,
            std::optional<at::ScalarType> dtype) {
           return kl_with_logits_fused_impl(input, target, beta, temperature, reduction, mask, num_items, probs, dtype,
                                            grad_input, grad_target, kLaunch);
         });
}

}  // namespace batchkl
