// The kl_with_logits kernels for bfloat16 inputs (kl_logits_kernel.cuh), in a
// file of their own so that a parallel build compiles each dtype's kernels
// beside the others'.
#include "kl_logits_kernel.cuh"

namespace batchkl {
namespace logits_cuda {

LogitsKernel logits_kernel_for(DtypeTag<at::BFloat16>, const LogitsLaunch& p, bool distill, bool ahead) {
  return logits_kernel_of<at::BFloat16>(p, distill, ahead);
}

}  // namespace logits_cuda
}  // namespace batchkl
