// The kl_with_logits kernels for float64 inputs (kl_logits_kernel.cuh), in a
// file of their own so that a parallel build compiles each dtype's kernels
// beside the others'.
#include "kl_logits_kernel.cuh"

namespace batchkl {
namespace logits_cuda {

LogitsKernel logits_kernel_for(DtypeTag<double>, const LogitsLaunch& p, bool distill, bool ahead) {
  return logits_kernel_of<double>(p, distill, ahead);
}

}  // namespace logits_cuda
}  // namespace batchkl
