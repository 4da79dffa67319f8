// Autocast for `batchkl::kl`: like aten::kl_div, the op runs in float32 under
// torch.autocast (16-bit inputs are cast up, float64 stays float64), so the
// drop-in gives F.kl_div's dtype and accuracy in mixed-precision code.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace batchkl {
namespace {

template <c10::DeviceType kDevice>
at::Tensor kl_autocast(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                       bool log_target) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("batchkl::kl", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, bool)>();
  return op.call(at::autocast::cached_cast(at::kFloat, input, kDevice),
                 at::autocast::cached_cast(at::kFloat, target, kDevice), reduction, log_target);
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, AutocastCPU, m) { m.impl("kl", kl_autocast<c10::DeviceType::CPU>); }
TORCH_LIBRARY_IMPL(batchkl, AutocastCUDA, m) { m.impl("kl", kl_autocast<c10::DeviceType::CUDA>); }

}  // namespace batchkl
