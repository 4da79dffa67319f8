// The CUDA kernel of `batchkl::kl*` (kl_cuda.cu launches it): a warp owns a
// tile (up to `chunk` columns of one row, see kl.h), streams it with 16-byte
// loads where every operand allows it, writes the elementwise result or the
// gradients, and warp-reduces the tile's loss in a fixed butterfly order. For
// reductions the tile sums go to a small workspace and the last block to
// finish (an integer ticket, no float atomics) adds them up in a fixed order,
// so the loss, the per-row results and the gradients come out of the same
// launch, bitwise reproducible and independent of the batch around a row.
// A header of its own so that tests/cpp/test_kl_emulated.cpp can run this
// very code on the CPU (tests/cpp/cuda_emulator.h).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../kl.h"

#if defined(BATCHKL_CUDA_EMULATOR)
// The emulator runs one CTA at a time, so a function's static is that CTA's
// shared variable.
#define BATCHKL_KL_SHARED static
#else
#define BATCHKL_KL_SHARED __shared__
#endif

namespace batchkl {
namespace kl_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte vectors in flight per operand per lane

template <typename scalar_t>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// What one element contributes, for each mode. `s` is the gradient scale
// (kReduce: 1 / grad_divisor) or grad_output (kBackward).
template <typename acc_t, Mode kMode, bool kLog>
struct Element {
  acc_t out = 0, grad_input = 0, grad_target = 0;
  __device__ __forceinline__ Element(acc_t x, acc_t t, acc_t s, bool gx, bool gt) {
    const KLTerm<kLog, acc_t> term(t);
    if constexpr (kMode != Mode::kBackward) out = term.loss(x);
    if constexpr (kMode != Mode::kElementwise) {
      if (gx) grad_input = term.grad_input() * s;
      if (gt) grad_target = term.grad_target(x) * s;
    }
  }
};

template <typename scalar_t, typename acc_t, Mode kMode, bool kLog>
struct TileRunner {
  const KLLaunch& p;
  acc_t scale;
  bool gx, gt;

  // The backward of 'none' reads the input only for the target's gradient:
  // the input's, -t (or -exp(t)) times grad_output, does not depend on it,
  // so skipping it saves one of the four N x V streams.
  __device__ __forceinline__ bool reads_input() const { return kMode != Mode::kBackward || gt; }

  // Scalar path: `count` elements from `j0`, lane-strided (coalesced when the
  // column stride is 1). Returns this lane's loss sum.
  __device__ __forceinline__ acc_t scalar(scalar_t* const (&ptr)[kNumOperands], const int64_t (&stride)[kNumOperands],
                                          int64_t j0, int64_t count, int lane) const {
    acc_t sum = 0;
    for (int64_t j = j0 + lane; j < j0 + count; j += 32) {
      const acc_t x = reads_input() ? static_cast<acc_t>(ptr[kInput][j * stride[kInput]]) : acc_t(0);
      const acc_t t = static_cast<acc_t>(ptr[kTarget][j * stride[kTarget]]);
      acc_t s = scale;
      if constexpr (kMode == Mode::kBackward) s = static_cast<acc_t>(ptr[kOut][j * stride[kOut]]);
      const Element<acc_t, kMode, kLog> e(x, t, s, gx, gt);
      if constexpr (kMode == Mode::kReduce) sum += e.out;
      if constexpr (kMode == Mode::kElementwise) ptr[kOut][j * stride[kOut]] = static_cast<scalar_t>(e.out);
      if (gx) ptr[kGradInput][j * stride[kGradInput]] = static_cast<scalar_t>(e.grad_input);
      if (gt) ptr[kGradTarget][j * stride[kGradTarget]] = static_cast<scalar_t>(e.grad_target);
    }
    return sum;
  }

  // Element i*N + e of a run starting at `base` (N = elements per 16 bytes):
  // one 16-byte access where the run is unit-stride and aligned (kVec),
  // N strided scalar accesses otherwise. Either way lane l holds the same
  // elements, so the loss is summed in the same order.
  template <bool kVec>
  __device__ __forceinline__ static Vec<scalar_t> load(const scalar_t* base, int64_t i, int64_t stride) {
    if constexpr (kVec) {
      return reinterpret_cast<const Vec<scalar_t>*>(base)[i];
    } else {
      Vec<scalar_t> v;
#pragma unroll
      for (int e = 0; e < Vec<scalar_t>::kSize; ++e) v.v[e] = base[(i * Vec<scalar_t>::kSize + e) * stride];
      return v;
    }
  }
  template <bool kVec>
  __device__ __forceinline__ static void store(scalar_t* base, int64_t i, int64_t stride, const Vec<scalar_t>& v) {
    if constexpr (kVec) {
      reinterpret_cast<Vec<scalar_t>*>(base)[i] = v;
    } else {
#pragma unroll
      for (int e = 0; e < Vec<scalar_t>::kSize; ++e) base[(i * Vec<scalar_t>::kSize + e) * stride] = v.v[e];
    }
  }

  // `nvec` groups of N consecutive elements from element `j0`; lane l takes
  // groups l, l + 32, l + 64, ... and adds a group's elements in order.
  template <bool kVec>
  __device__ __forceinline__ acc_t groups(scalar_t* const (&ptr)[kNumOperands],
                                          const int64_t (&stride)[kNumOperands], int64_t j0, int64_t nvec,
                                          int lane) const {
    using V = Vec<scalar_t>;
    constexpr int N = V::kSize;
    scalar_t* at[kNumOperands];
#pragma unroll
    for (int k = 0; k < kNumOperands; ++k) at[k] = ptr[k] ? ptr[k] + j0 * stride[k] : nullptr;
    acc_t sum = 0;
    for (int64_t base = 0; base < nvec; base += 32 * kUnroll) {
      V xv[kUnroll], tv[kUnroll], gv[kUnroll];
      // All loads first: kUnroll independent accesses per operand in flight.
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < nvec) {
          xv[u] = reads_input() ? load<kVec>(at[kInput], i, stride[kInput]) : V{};
          tv[u] = load<kVec>(at[kTarget], i, stride[kTarget]);
          if constexpr (kMode == Mode::kBackward) gv[u] = load<kVec>(at[kOut], i, stride[kOut]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i >= nvec) continue;
        V o, a, b;
#pragma unroll
        for (int e = 0; e < N; ++e) {
          acc_t s = scale;
          if constexpr (kMode == Mode::kBackward) s = static_cast<acc_t>(gv[u].v[e]);
          const Element<acc_t, kMode, kLog> el(static_cast<acc_t>(xv[u].v[e]), static_cast<acc_t>(tv[u].v[e]), s,
                                               gx, gt);
          if constexpr (kMode == Mode::kReduce) sum += el.out;
          o.v[e] = static_cast<scalar_t>(el.out);
          a.v[e] = static_cast<scalar_t>(el.grad_input);
          b.v[e] = static_cast<scalar_t>(el.grad_target);
        }
        if constexpr (kMode == Mode::kElementwise) store<kVec>(at[kOut], i, stride[kOut], o);
        if (gx) store<kVec>(at[kGradInput], i, stride[kGradInput], a);
        if (gt) store<kVec>(at[kGradTarget], i, stride[kGradTarget], b);
      }
    }
    return sum;
  }

  // One tile; returns this lane's share of the tile's loss.
  __device__ __forceinline__ acc_t tile(int64_t tile_index, int lane) const {
    const RowGeometry& g = p.geo;
    // A 64-bit division costs dozens of instructions: skip it for the common
    // one-tile-per-row case (V <= 8k).
    const int64_t row = g.chunks_per_row == 1 ? tile_index : tile_index / g.chunks_per_row;
    const int64_t col0 = (tile_index - row * g.chunks_per_row) * g.chunk;
    const int64_t n = g.chunk < g.cols - col0 ? g.chunk : g.cols - col0;
    scalar_t* ptr[kNumOperands];
    int64_t stride[kNumOperands];
    bool unit = true, aligned = true, same_mis = true;
    uintptr_t mis = 0;
    bool first = true;
#pragma unroll
    for (int k = 0; k < kNumOperands; ++k) {
      auto* base = static_cast<scalar_t*>(p.ptr[k]);
      stride[k] = g.col_stride[k];
      ptr[k] = base ? base + g.row_offset(k, row) + col0 * stride[k] : nullptr;
      if (base) {
        unit &= stride[k] == 1;
        const uintptr_t m = reinterpret_cast<uintptr_t>(ptr[k]) % 16;
        aligned &= m == 0;
        same_mis &= first || m == mis;
        mis = m;
        first = false;
      }
    }
    constexpr int N = Vec<scalar_t>::kSize;
    if constexpr (kMode != Mode::kReduce) {
      // Nothing is summed, so the order is free: peel an unaligned head so
      // that a misaligned view (x[:, 1:]) still streams with 16-byte accesses.
      if (unit && !aligned && same_mis && mis % sizeof(scalar_t) == 0) {
        const int64_t align_head = static_cast<int64_t>((16 - mis) % 16 / sizeof(scalar_t));
        const int64_t head = align_head < n ? align_head : n;
        const int64_t nvec = (n - head) / N;
        scalar(ptr, stride, 0, head, lane);
        groups<true>(ptr, stride, head, nvec, lane);
        scalar(ptr, stride, head + nvec * N, n - head - nvec * N, lane);
        return 0;
      }
    }
    // The loss is summed in one order for every tile of a given width,
    // whatever its alignment and strides: a row's result does not depend on
    // where it sits in memory or in the batch.
    const int64_t nvec = n / N;
    acc_t sum = unit && aligned ? groups<true>(ptr, stride, 0, nvec, lane) : groups<false>(ptr, stride, 0, nvec, lane);
    sum += scalar(ptr, stride, nvec * N, n - nvec * N, lane);
    return sum;
  }
};

template <typename scalar_t, typename acc_t, Mode kMode, bool kLog>
__global__ void __launch_bounds__(kThreads) kl_kernel(const KLLaunch p, acc_t* __restrict__ partials,
                                                      unsigned int* __restrict__ ticket) {
  const int lane = threadIdx.x & 31;
  const RowGeometry& g = p.geo;
  const TileRunner<scalar_t, acc_t, kMode, kLog> runner{p, static_cast<acc_t>(1.0 / p.grad_divisor),
                                                        p.ptr[kGradInput] != nullptr,
                                                        p.ptr[kGradTarget] != nullptr};
  const int64_t ntiles = g.num_tiles();
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; t < ntiles; t += warps) {
    acc_t s = runner.tile(t, lane);
    if constexpr (kMode == Mode::kReduce) {
      s = warp_sum(s);
      if (lane == 0) {
        if (p.row_out != nullptr && g.chunks_per_row == 1) {
          static_cast<scalar_t*>(p.row_out)[t] = static_cast<scalar_t>(s);
        } else {
          partials[t] = s;
        }
      }
    }
  }
  if constexpr (kMode == Mode::kReduce) {
    if (p.row_out != nullptr && g.chunks_per_row == 1) return;  // rows already written
    // Last block in: each writer fences its tile sums before the block takes
    // its ticket, so the block holding the last ticket sees all of them.
    BATCHKL_KL_SHARED bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (p.row_out != nullptr) {
      // A thread takes kRows rows at once, chunk by chunk: a row at a time
      // had only its own chunks' loads in flight (the store to row_out keeps
      // the next row's behind it), 4 for rows of 32k columns, so the last
      // CTA took 32 L2 round trips for 8192 rows; with kRows rows, 16 loads
      // and 8 round trips (sm_90 SASS; unmeasured). Each row still adds its
      // chunks in order: the same bits.
      constexpr int kRows = 4;
      for (int64_t r0 = threadIdx.x; r0 < g.rows; r0 += int64_t{kThreads} * kRows) {
        acc_t s[kRows] = {};
        for (int64_t c = 0; c < g.chunks_per_row; ++c) {
#pragma unroll
          for (int u = 0; u < kRows; ++u) {
            const int64_t r = r0 + int64_t{u} * kThreads;
            if (r < g.rows) s[u] += __ldcg(partials + r * g.chunks_per_row + c);
          }
        }
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int64_t r = r0 + int64_t{u} * kThreads;
          if (r < g.rows) static_cast<scalar_t*>(p.row_out)[r] = static_cast<scalar_t>(s[u]);
        }
      }
      return;
    }
    // Independent accumulators keep several L2 loads in flight; which
    // partial goes to which accumulator is fixed, so the sum stays bitwise
    // reproducible.
    constexpr int kAcc = 8;
    double acc[kAcc] = {};
    int64_t i = threadIdx.x;
    for (; i + (kAcc - 1) * kThreads < ntiles; i += kAcc * kThreads) {
#pragma unroll
      for (int u = 0; u < kAcc; ++u) acc[u] += static_cast<double>(__ldcg(partials + i + u * kThreads));
    }
    for (; i < ntiles; i += kThreads) acc[0] += static_cast<double>(__ldcg(partials + i));
#pragma unroll
    for (int u = 1; u < kAcc; ++u) acc[0] += acc[u];
    BATCHKL_KL_SHARED double block[kThreads];
    block[threadIdx.x] = acc[0];
    __syncthreads();
#pragma unroll
    for (int width = kThreads / 2; width > 0; width >>= 1) {
      if (threadIdx.x < width) block[threadIdx.x] += block[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) *static_cast<scalar_t*>(p.scalar_out) = static_cast<scalar_t>(block[0] / p.divisor);
  }
}

}  // namespace kl_cuda
}  // namespace batchkl
