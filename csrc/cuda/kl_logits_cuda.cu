// CUDA backend of `batchkl::kl_with_logits*`: the launcher of the kernel in
// kl_logits_kernel.cuh (the loss and the gradients in one launch; a second,
// tiny one counts the rows a mask keeps when the loss is divided by that).
// The kernels themselves are compiled in kl_logits_kernel_<dtype>.cu.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "../register_backend.h"
#include "kl_logits_kernel.cuh"

namespace batchkl {
namespace logits_cuda {
namespace {

// Developer knobs for tuning runs on a GPU (scripts/tune_logits.py), read
// once per process; a setting changes the launch shape and so the order of
// the sums, and results are deterministic for each setting:
//   BATCHKL_LOGITS_SLICE_KIB  the shared memory a CTA's slice aims at (default 64; set to
//                             anything else, it also turns the distillation kernel's
//                             streaming rule off)
//   BATCHKL_LOGITS_STAGE      0: never stage a slice (every sweep reads global memory);
//                             1: stage it wherever it fits (the default stages only
//                             where two CTAs still fit on an SM; see plan_grid)
//   BATCHKL_LOGITS_ROW_LANES  threads per short row (1, 2, 4, 8, 16 or 32; default: by
//                             its length, kPacksPerLane)
//   BATCHKL_LOGITS_WARP_ROW_COLS  the longest row on a warp, in columns, for every dtype
//                             (default: 2048, 16-bit rows 4096; see kWarpRowBytes)
//   BATCHKL_LOGITS_LEAN       the forward KL where the target needs no gradient: 0 the
//                             general sweep, 1 the lean one, 2 (the default) the lean one
//                             in a kernel of its own that runs three CTAs per SM; 3 also
//                             JSD and reverse KL from logits where the target needs no
//                             gradient, in kernels of their own with three CTAs per SM;
//                             JSD from logits: 0 its general sweeps, else its lean ones
//                             (LaunchKnobs::lean)
//   BATCHKL_LOGITS_SHARE      0: a cluster's row loss is all-reduced, not added up in rank 0
//   BATCHKL_LOGITS_MERGE      1: a row's maxes and sums in one exchange (LaunchKnobs::merge)
//   BATCHKL_LOGITS_DISTILL_STREAM  0: the distillation kernel's long rows planned as the
//                             general kernel's, not streamed in 256 KiB slices
//   BATCHKL_LOGITS_REUSE      streamed rows: 0 every sweep forward, an evict-normal cache
//                             policy; 1 sweeps alternate direction; 2 (the default) also
//                             evict-first on the gradient's stores and the distillation
//                             kernel's last read (LaunchKnobs::reuse)
//   BATCHKL_LOGITS_PREFETCH   1: on Hopper, the distillation kernel's rows of up to 16
//                             slices of half the slice budget run double-buffered on as
//                             many clusters as fit at once, each CTA's next row coming by
//                             bulk copy while it computes this one (LaunchKnobs::prefetch;
//                             off by default); with BATCHKL_LOGITS_LEAN=3 JSD's and reverse
//                             KL's distillation kernels' rows too
//   BATCHKL_LOGITS_KEEP       JSD from logits on staged rows, the student's gradient alone:
//                             the totals sweep keeps log2 q - log2 m for the writing sweep;
//                             0 never, 1 (the default) float32 and float64 rows (exact), 2
//                             also bfloat16 rows, as float16 (LaunchKnobs::keep)

// `name`'s value, 0 or 1, into `out` where it is set.
void read_flag(const char* name, bool& out) {
  if (const char* value = std::getenv(name)) {
    const std::string s(value);
    TORCH_CHECK(s == "0" || s == "1", name, ": expected 0 or 1, got '", s, "'");
    out = s == "1";
  }
}

// `name`'s value, a whole number of `unit` from 1 to `max`, where it is set.
std::optional<int64_t> read_count(const char* name, const char* unit, long long max) {
  const char* value = std::getenv(name);
  if (value == nullptr) return std::nullopt;
  char* end = nullptr;
  const long long n = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && n > 0 && n <= max, name, ": expected a whole number of ", unit,
              " from 1 to ", max, ", got '", value, "'");
  return n;
}

const LaunchKnobs& tuning() {
  static const LaunchKnobs t = [] {
    LaunchKnobs v;
    if (const auto kib = read_count("BATCHKL_LOGITS_SLICE_KIB", "KiB", 1024)) v.slice_budget = *kib * 1024;
    if (const char* stage = std::getenv("BATCHKL_LOGITS_STAGE")) {
      const std::string s(stage);
      TORCH_CHECK(s == "0" || s == "1", "BATCHKL_LOGITS_STAGE: expected 0 or 1, got '", s, "'");
      v.stage = s == "1" ? StageMode::kWhereFits : StageMode::kNever;
    }
    if (const char* lanes = std::getenv("BATCHKL_LOGITS_ROW_LANES")) {
      const std::string s(lanes);
      TORCH_CHECK(s == "1" || s == "2" || s == "4" || s == "8" || s == "16" || s == "32",
                  "BATCHKL_LOGITS_ROW_LANES: expected 1, 2, 4, 8, 16 or 32, got '", s, "'");
      v.row_lanes = std::stoi(s);
    }
    if (const auto cols = read_count("BATCHKL_LOGITS_WARP_ROW_COLS", "columns", 1 << 20)) v.warp_row_cols = *cols;
    if (const char* lean = std::getenv("BATCHKL_LOGITS_LEAN")) {
      const std::string s(lean);
      TORCH_CHECK(s == "0" || s == "1" || s == "2" || s == "3", "BATCHKL_LOGITS_LEAN: expected 0, 1, 2 or 3, got '",
                  s, "'");
      v.lean = std::stoi(s);
    }
    if (const char* reuse = std::getenv("BATCHKL_LOGITS_REUSE")) {
      const std::string s(reuse);
      TORCH_CHECK(s == "0" || s == "1" || s == "2", "BATCHKL_LOGITS_REUSE: expected 0, 1 or 2, got '", s, "'");
      v.reuse = std::stoi(s);
    }
    if (const char* keep = std::getenv("BATCHKL_LOGITS_KEEP")) {
      const std::string s(keep);
      TORCH_CHECK(s == "0" || s == "1" || s == "2", "BATCHKL_LOGITS_KEEP: expected 0, 1 or 2, got '", s, "'");
      v.keep = std::stoi(s);
    }
    read_flag("BATCHKL_LOGITS_SHARE", v.share);
    read_flag("BATCHKL_LOGITS_MERGE", v.merge);
    read_flag("BATCHKL_LOGITS_DISTILL_STREAM", v.distill_stream);
    read_flag("BATCHKL_LOGITS_PREFETCH", v.prefetch);
    return v;
  }();
  return t;
}

// What the current GPU offers `kernel`, which is prepared once per device
// (`seen[device]`: 0 not yet, 1 done and without clusters, 2 with them):
// - its shared-memory limit is raised to the most the GPU offers. It is a
//   property of the kernel, not of a launch, so it is never lowered (another
//   thread may be launching the kernel with a larger slice);
// - clusters need an sm_90+ GPU and code compiled for one: a build for
//   sm_80 + PTX that the driver JIT-compiles on a Hopper has no cluster code
//   (kl_logits_kernel.cuh), so its rows stay in one CTA.
template <typename Kernel>
DeviceLimits prepare(Kernel kernel, std::array<std::atomic<int>, 64>& seen) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int device = at::cuda::current_device();
  int state = device < 64 ? seen[device].load(std::memory_order_acquire) : 0;
  if (state == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(prop->sharedMemPerBlockOptin)));
    bool clusters = false;
    if (prop->major >= 9) {
      cudaFuncAttributes attr;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
      clusters = attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
    }
    state = clusters ? 2 : 1;
    if (device < 64) seen[device].store(state, std::memory_order_release);
  }
  DeviceLimits dev;
  dev.sms = prop->multiProcessorCount;
  dev.max_smem = prop->sharedMemPerBlockOptin;
  dev.smem_per_sm = prop->sharedMemPerMultiprocessor;
  dev.smem_reserved = prop->reservedSharedMemPerBlock;
  dev.clusters = state == 2;
  dev.knobs = tuning();
  return dev;
}

// The largest cluster for the kAhead kernel: kMaxClusterAhead where the
// driver lets it ask for clusters beyond the portable 8 (Hopper runs up to
// 16 for a kernel that asks), else 8. `seen[device]`: 0 not yet asked, 1
// refused, 2 allowed.
template <typename Kernel>
int max_cluster_ahead(Kernel kernel, std::array<std::atomic<int>, 64>& seen) {
  const int device = at::cuda::current_device();
  int state = device < 64 ? seen[device].load(std::memory_order_acquire) : 0;
  if (state == 0) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e == cudaErrorInvalidValue || e == cudaErrorNotSupported) {
      (void)cudaGetLastError();  // a refusal, not a failure: the plans keep to 8
    } else {
      C10_CUDA_CHECK(e);
    }
    state = e == cudaSuccess ? 2 : 1;
    if (device < 64) seen[device].store(state, std::memory_order_release);
  }
  return state == 2 ? kMaxClusterAhead : kMaxCluster;
}

template <typename scalar_t, Divergence kDiv, bool kProbs>
void launch_typed(const LogitsLaunch& p) {
  constexpr int64_t elem = sizeof(scalar_t);
  const RowGeometry& geo = p.geo;
  const bool distill = use_distill_kernel(tuning(), p);
  const LogitsKernel planned = logits_kernel_for(DtypeTag<scalar_t>{}, p, distill, false);
  TORCH_INTERNAL_ASSERT(planned != nullptr, "batchkl.kl_with_logits: no CUDA kernel for this divergence");
  // Per kernel (the general one, the kDistill one and its kAhead twin: one
  // divergence's, as this function is) and device (prepare; the last: the
  // twin's clusters beyond 8).
  static std::array<std::array<std::atomic<int>, 64>, 4> seen{};
  DeviceLimits dev = prepare(planned, seen[distill ? 1 : 0]);
  // The twin has the same limits (shared memory, clusters): its own prepare
  // only raises its shared-memory limit.
  LogitsKernel ahead = nullptr;
  const PlanFor plan = plan_for(dev.knobs, p);
  if (dev.clusters && dev.knobs.prefetch && plan != PlanFor::kGeneral) {
    ahead = logits_kernel_for(DtypeTag<scalar_t>{}, p, distill, true);
    prepare(ahead, seen[2]);
    dev.max_cluster_ahead = max_cluster_ahead(ahead, seen[3]);
  }
  Grid grid = plan_grid(geo.rows, geo.cols, elem, dev, plan);
  LogitsKernel kernel = grid.prefetch ? ahead : planned;

  auto stream = at::cuda::getCurrentCUDAStream();
  const auto opts = at::TensorOptions().device(at::kCUDA, at::cuda::current_device());
  // One word for the ticket and one for the kept-row count, zeroed together.
  const at::Tensor words = at::empty({2}, opts.dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(words.data_ptr(), 0, 2 * sizeof(int64_t), stream));
  auto* const ticket = reinterpret_cast<unsigned int*>(words.data_ptr<int64_t>());
  auto* const kept = reinterpret_cast<unsigned long long*>(words.data_ptr<int64_t>() + 1);
  at::Tensor workspace;
  double* row_loss = p.row_out;
  if (row_loss == nullptr) {
    workspace = at::empty({geo.rows}, opts.dtype(at::kDouble));
    row_loss = workspace.data_ptr<double>();
  }
  if (p.divide_by_kept_rows) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((geo.rows + kThreads - 1) / kThreads, 1024));
    count_kept_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p.mask, geo.rows, kept);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (grid.warp_rows) {
    kernel<<<static_cast<unsigned>(grid.blocks), kThreads, grid.smem, stream>>>(p, grid, row_loss, ticket, kept);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  TORCH_CHECK(grid.blocks <= std::numeric_limits<int32_t>::max(), "batchkl.kl_with_logits: ", geo.rows,
              " rows of ", geo.cols, " columns need more CTAs than one launch can have");
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  int resident = 0;  // clusters of the grid that fit on the GPU at once
  // Sets up `config` for the grid, on the kernel it selects.
  const auto fits = [&](const Grid& g) {
    kernel = g.prefetch ? ahead : planned;
    config.gridDim = dim3(static_cast<unsigned>(g.blocks));
    config.dynamicSmemBytes = g.smem;
    config.numAttrs = 0;
    if (g.cluster > 1) {
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = static_cast<unsigned>(g.cluster);
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      config.attrs = attr;
      config.numAttrs = 1;
    }
    if (g.cluster == 1) {
      if (g.prefetch) {
        int per_sm = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, g.smem));
        resident = per_sm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      }
      return true;
    }
    const cudaError_t e = cudaOccupancyMaxActiveClusters(&resident, kernel, &config);
    if (e != cudaSuccess && g.cluster > kMaxCluster) {
      // A GPU that takes the attribute but not a cluster this large: as one
      // that cannot hold it (settle_plan plans within 8).
      (void)cudaGetLastError();
      resident = 0;
    } else {
      C10_CUDA_CHECK(e);
    }
    return resident > 0;
  };
  // The last call of `fits` was on the settled grid: `config`, `kernel` and
  // `resident` are its.
  grid = settle_plan(grid, geo.rows, geo.cols, elem, dev, plan, fits);
  if (grid.prefetch) {
    TORCH_INTERNAL_ASSERT(grid.stage && !grid.warp_rows, "batchkl.kl_with_logits: double-buffered rows unstaged");
    cut_to_resident(grid, geo.rows, resident);
  }
  config.gridDim = dim3(static_cast<unsigned>(grid.blocks));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, grid, row_loss, ticket,
                                    static_cast<const unsigned long long*>(kept)));
}

void launch_logits_cuda(const LogitsLaunch& p) {
  dispatch_logits(p, [&](auto div, auto probs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "batchkl_kl_with_logits_cuda", [&] {
      launch_typed<scalar_t, decltype(div)::value, decltype(probs)::value>(p);
    });
  });
}

}  // namespace
}  // namespace logits_cuda

TORCH_LIBRARY_IMPL(batchkl, CUDA, m) { register_logits_backend<logits_cuda::launch_logits_cuda>(m); }

}  // namespace batchkl
