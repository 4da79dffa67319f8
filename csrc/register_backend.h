// Binds the `batchkl::kl*` schemas to one backend's launcher. Included by the
// CPU and CUDA backends so both register the very same entry points.
#pragma once

#include <torch/library.h>

#include "kl.h"

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

}  // namespace batchkl
