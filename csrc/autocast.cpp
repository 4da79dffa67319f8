// Autocast for the batchkl ops. `kl`: like aten::kl_div, the op runs in float32 under
// torch.autocast (16-bit inputs are cast up, float64 stays float64), so the
// drop-in gives F.kl_div's dtype and accuracy in mixed-precision code.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "include/batchkl/batchkl.h"

namespace batchkl {
namespace {

template <c10::DeviceType kDevice>
at::Tensor kl_autocast(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                       bool log_target) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  return kl(at::autocast::cached_cast(at::kFloat, input, kDevice), at::autocast::cached_cast(at::kFloat, target, kDevice),
            reduction, log_target);
}

// kl_with_logits: the composite formula runs in float32 under autocast
// (log_softmax and kl_div are on its float32 list). The kernel computes in
// float32 or wider whatever the storage type, so instead of casting the N x V
// logits up (two full copies) it runs on them as they are and returns its
// result in float32 (float64 stays float64): the composite formula's dtype,
// and gradients in the logits' own dtype, as autograd through the casts
// would give them.
template <c10::DeviceType kDevice>
at::Tensor kl_with_logits_autocast(const at::Tensor& input, const at::Tensor& target, double beta, double temperature,
                                   c10::string_view reduction, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& num_items, bool probs,
                                   std::optional<at::ScalarType> dtype) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  if (!dtype.has_value() && at::result_type(input, target) != at::kDouble) dtype = at::kFloat;
  return kl_with_logits(input, target, beta, temperature, reduction, mask, num_items, probs, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, AutocastCPU, m) {
  m.impl("kl", kl_autocast<c10::DeviceType::CPU>);
  m.impl("kl_with_logits", kl_with_logits_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(batchkl, AutocastCUDA, m) {
  m.impl("kl", kl_autocast<c10::DeviceType::CUDA>);
  m.impl("kl_with_logits", kl_with_logits_autocast<c10::DeviceType::CUDA>);
}

}  // namespace batchkl
