// CUDA backend of `batchkl::kl*`: one launch per call of the kernel in
// kl_kernel.cuh (which says how it works), with the workspace and the ticket
// of its reductions, and the kernel that scales a saved gradient by
// grad_output in the backward.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>

#include "../kl.h"
#include "../register_backend.h"
#include "kl_kernel.cuh"

namespace batchkl {
namespace {

using kl_cuda::kl_kernel;
using kl_cuda::kThreads;
using kl_cuda::kWarps;
using kl_cuda::Vec;

template <typename scalar_t, Mode kMode, bool kLog>
void launch_typed(const KLLaunch& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ntiles = p.geo.num_tiles();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Enough resident blocks to fill every SM (8 x 256 threads each); the
  // grid-stride loop takes the rest.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((ntiles + kWarps - 1) / kWarps, sms * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials, ticket;
  if constexpr (kMode == Mode::kReduce) {
    const auto opts = at::TensorOptions().device(at::kCUDA, at::cuda::current_device());
    partials = at::empty({ntiles}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    ticket = at::empty({1}, opts.dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(ticket.data_ptr(), 0, sizeof(unsigned int), stream));
  }
  kl_kernel<scalar_t, acc_t, kMode, kLog><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p, partials.defined() ? partials.data_ptr<acc_t>() : nullptr,
      ticket.defined() ? reinterpret_cast<unsigned int*>(ticket.data_ptr<int>()) : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_cuda(const KLLaunch& p) {
  dispatch_mode(p, [&](auto mode, auto log) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "batchkl_kl_cuda",
                                    [&] { launch_typed<scalar_t, decltype(mode)::value, decltype(log)::value>(p); });
  });
}

// grad[r, :] *= scale[r] (or scale[0] for all rows), a warp per tile of a
// row, 16-byte accesses, the scale in the gradient's dtype or its math type
// (scale_t). A tile whose scale is exactly 1 is not touched, so
// `loss.backward()` costs one tiny launch and no pass over the gradient, and
// no host sync to find that out.
template <typename scalar_t, typename scale_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(scalar_t* __restrict__ grad, int64_t rows, int64_t cols,
                                                         int64_t chunk, int64_t chunks_per_row,
                                                         const scale_t* __restrict__ scale, bool per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int N = V::kSize;
  const int lane = threadIdx.x & 31;
  const int64_t ntiles = rows * chunks_per_row;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; t < ntiles; t += warps) {
    const int64_t r = t / chunks_per_row;
    const acc_t s = static_cast<acc_t>(scale[per_row ? r : 0]);
    if (s == acc_t(1)) continue;
    const int64_t c0 = (t - r * chunks_per_row) * chunk;
    const int64_t n = chunk < cols - c0 ? chunk : cols - c0;
    scalar_t* q = grad + r * cols + c0;
    const int64_t align_head = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(q) % 16) % 16 / sizeof(scalar_t));
    const int64_t head = align_head < n ? align_head : n;
    const int64_t nvec = (n - head) / N;
    const auto mul = [s](scalar_t& v) { v = static_cast<scalar_t>(static_cast<acc_t>(v) * s); };
    for (int64_t j = lane; j < head; j += 32) mul(q[j]);
    V* qv = reinterpret_cast<V*>(q + head);
    for (int64_t i = lane; i < nvec; i += 32) {
      V v = qv[i];
#pragma unroll
      for (int e = 0; e < N; ++e) mul(v.v[e]);
      qv[i] = v;
    }
    for (int64_t j = head + nvec * N + lane; j < n; j += 32) mul(q[j]);
  }
}

void scale_cuda(at::Tensor& grad, const at::Tensor& scale) {
  const bool per_row = scale.numel() > 1;
  const int64_t rows = per_row ? scale.numel() : 1;
  const int64_t cols = grad.numel() / rows;
  const int64_t chunk = chunk_for(cols);
  const int64_t chunks_per_row = (cols + chunk - 1) / chunk;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((rows * chunks_per_row + kWarps - 1) / kWarps, sms * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "batchkl_scale_cuda", [&] {
    const auto run = [&](const auto* s) {
      scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), rows, cols, chunk, chunks_per_row, s, per_row);
    };
    // (kl_scale_impl gave it one of the two.)
    if (scale.scalar_type() == grad.scalar_type()) {
      run(scale.const_data_ptr<scalar_t>());
    } else {
      run(scale.const_data_ptr<at::opmath_type<scalar_t>>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, CUDA, m) { register_backend<launch_cuda, scale_cuda>(m); }

}  // namespace batchkl
