// The CUDA kernel of `batchkl::kl` (csrc/cuda/kl_kernel.cuh) run on the CPU by
// tests/cpp/cuda_emulator.h, against the CPU kernel: every mode (the
// elementwise 'none', the reductions' fused forward with its last-block
// epilogue, 'row' included, and the backward of 'none'), the four dtypes,
// log_target, the 16-byte and element-wise paths (misaligned, strided and
// broadcast operands), rows of one tile and of several, grids with fewer warps
// than tiles, the 'row' epilogue's four rows per thread past the first 256
// rows; and bitwise: a row alone vs in its batch, one grid size vs another.
//
// Built into one executable with the host code and the CPU kernel (the
// reference), not linked to libbatchkl. Prints every failed check; exits
// non-zero if there was one.
#include "cuda_emulator.h"
// (first: it defines what the kernel header expects of CUDA)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "check_close.h"
#include "cuda/kl_kernel.cuh"
#include "kl.h"

namespace {

using batchkl::KLLaunch;
using batchkl::Mode;
using batchkl_test::check;
using batchkl_test::check_close;
using batchkl_test::g_checks;
using batchkl_test::g_failures;

using c10::str;

// The emulated GPU's SMs: kl_cuda.cu launches min(tiles / 8 warps, 8 blocks
// per SM) blocks, and the grid-stride loop takes the tiles beyond them.
int64_t g_sms = 2;

// What kl_cuda.cu's launcher does, with host memory and the emulator. The
// workspace starts as NaN, so that a tile sum read before it was written shows.
template <typename scalar_t, Mode kMode, bool kLog>
void launch_typed(const KLLaunch& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using batchkl::kl_cuda::kThreads;
  using batchkl::kl_cuda::kWarps;
  const int64_t ntiles = p.geo.num_tiles();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((ntiles + kWarps - 1) / kWarps, g_sms * 8));
  std::vector<acc_t> partials(kMode == Mode::kReduce ? ntiles : 0, std::numeric_limits<acc_t>::quiet_NaN());
  unsigned ticket = 0;
  acc_t* const workspace = partials.empty() ? nullptr : partials.data();
  unsigned* const ticket_ptr = &ticket;
  batchkl_emu::launch(static_cast<unsigned>(blocks), kThreads, 0, 1,
                      batchkl::kl_cuda::kl_kernel<scalar_t, acc_t, kMode, kLog>, p, workspace, ticket_ptr);
}

void launch_emulated(const KLLaunch& p) {
  batchkl::dispatch_mode(p, [&](auto mode, auto log) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "emulated", [&] {
      launch_typed<scalar_t, decltype(mode)::value, decltype(log)::value>(p);
    });
  });
}

using Fused = batchkl::FusedResult;

Fused emulated(const at::Tensor& x, const at::Tensor& t, const std::string& reduction, bool log_target, bool gi,
               bool gt) {
  return batchkl::kl_fused_impl(x, t, reduction, log_target, gi, gt, launch_emulated);
}

Fused cpu_kernel(const at::Tensor& x, const at::Tensor& t, const std::string& reduction, bool log_target, bool gi,
                 bool gt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("batchkl::kl_fused", "")
                       .typed<Fused(const at::Tensor&, const at::Tensor&, c10::string_view, bool, bool, bool)>();
  return op.call(x, t, reduction, log_target, gi, gt);
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t,
                                            bool log_target, bool emulate) {
  if (emulate) return batchkl::kl_none_backward_impl(g, x, t, log_target, true, true, launch_emulated);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("batchkl::kl_none_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, bool, bool, bool)>();
  return op.call(g, x, t, log_target, true, true);
}

void check_bitwise(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  check(batchkl_test::same_values(a, b), what + ": not bitwise equal");
}

// Both compute in the same formulas and types; only the loss sums' order
// differs (the CPU's vector lanes and tiles, the GPU's lanes, butterflies and
// tile sums).
double rtol_for(at::ScalarType dt) {
  return dt == at::kDouble ? 1e-12 : dt == at::kFloat ? 2e-6 : dt == at::kHalf ? 1e-3 : 8e-3;
}
double atol_for(at::ScalarType dt) { return dt == at::kDouble ? 1e-13 : dt == at::kFloat ? 1e-6 : 1e-3; }

void compare(const at::Tensor& x, const at::Tensor& t, const std::string& reduction, bool log_target,
             const std::string& what, bool gi = true, bool gt = true) {
  Fused e;
  try {
    e = emulated(x, t, reduction, log_target, gi, gt);
  } catch (const std::exception& ex) {
    check(false, str(what, ": emulated kernel threw ", ex.what()));
    return;
  }
  const Fused r = cpu_kernel(x, t, reduction, log_target, gi, gt);
  const auto dt = std::get<0>(r).scalar_type();
  const double rtol = rtol_for(dt), atol = atol_for(dt);
  check_close(std::get<0>(e), std::get<0>(r), rtol, atol, what + " loss");
  if (gi) check_close(std::get<1>(e), std::get<1>(r), rtol, atol, what + " grad_input");
  if (gt) check_close(std::get<2>(e), std::get<2>(r), rtol, atol, what + " grad_target");
}

// log-probabilities x and target probabilities (their logs with log_target),
// with exact zeros, -inf inputs and a NaN where `special`.
std::pair<at::Tensor, at::Tensor> inputs(int64_t rows, int64_t cols, at::ScalarType dt, bool log_target,
                                         bool special) {
  auto x = at::log_softmax(at::randn({rows, cols}, at::kDouble) * 2, -1);
  auto p = at::softmax(at::randn({rows, cols}, at::kDouble) * 2, -1);
  if (special && cols > 4) {
    p.select(1, 1).zero_();                                               // zero-probability rule
    x.select(1, 2).fill_(-std::numeric_limits<double>::infinity());       // +inf terms
    x[0][3] = std::numeric_limits<double>::quiet_NaN();                   // a NaN row
  }
  auto t = log_target ? at::log(p) : p;
  return {x.to(dt), t.to(dt)};
}

const std::vector<std::string> kReductions = {"none", "sum", "mean", "batchmean", "row"};

void test_modes_dtypes_shapes() {
  // 8300 columns: two tiles a row (kl.h's chunk_for), the second shorter.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{3, 37}, {1, 1}, {7, 2048}, {2, 8300}, {40, 300}};
  for (const int64_t sms : {1, 3}) {
    g_sms = sms;
    for (const auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      for (const auto& [rows, cols] : shapes) {
        for (const bool log_target : {false, true}) {
          for (const bool special : {false, true}) {
            const auto [x, t] = inputs(rows, cols, dt, log_target, special);
            for (const auto& red : kReductions) {
              compare(x, t, red, log_target,
                      str("sms=", sms, " ", dt, " ", rows, "x", cols, " log_target=", log_target,
                          special ? " special " : " ", red));
            }
            compare(x, t, "sum", log_target, str(dt, " ", rows, "x", cols, " sum, grad_target alone"), false, true);
          }
        }
      }
    }
  }
  g_sms = 2;
}

// The same values through the element-wise path: a view one element past a
// 16-byte boundary, a strided last dim, a target broadcast along the rows.
void test_layouts() {
  for (const auto dt : {at::kFloat, at::kBFloat16}) {
    for (const int64_t cols : {37, 8300}) {
      const auto [x, t] = inputs(5, cols, dt, false, false);
      auto big = at::empty({5, cols + 1}, x.options());
      auto misaligned = big.narrow(1, 1, cols);
      misaligned.copy_(x);
      auto wide = at::empty({5, cols, 2}, x.options());
      auto strided = wide.select(2, 0);
      strided.copy_(x);
      for (const auto& red : kReductions) {
        compare(misaligned, t, red, false, str(dt, " misaligned input V=", cols, " ", red));
        compare(x, t.t().contiguous().t(), red, false, str(dt, " column-major target V=", cols, " ", red));
        compare(strided, t, red, false, str(dt, " strided input V=", cols, " ", red));
        compare(x, t.narrow(0, 0, 1), red, false, str(dt, " broadcast target V=", cols, " ", red));
      }
    }
  }
}

// The backward of 'none': grad_output times the elementwise gradients.
void test_none_backward() {
  for (const auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (const int64_t cols : {37, 8300}) {
      for (const bool log_target : {false, true}) {
        const auto [x, t] = inputs(4, cols, dt, log_target, true);
        const auto g = at::randn({4, cols}, at::kDouble).to(dt);
        const auto [egi, egt] = backward(g, x, t, log_target, true);
        const auto [rgi, rgt] = backward(g, x, t, log_target, false);
        const std::string what = str(dt, " V=", cols, " log_target=", log_target, " none backward");
        check_close(egi, rgi, rtol_for(dt), atol_for(dt), what + " grad_input");
        check_close(egt, rgt, rtol_for(dt), atol_for(dt), what + " grad_target");
      }
    }
  }
}

// 'row' on more rows than a block's threads: the last block's epilogue takes
// four rows per thread (rows r0 + u * 256), chunk by chunk. Every row against
// the CPU kernel, and rows at the seams bitwise as when computed alone.
void test_row_epilogue() {
  for (const auto dt : {at::kFloat, at::kBFloat16}) {
    const int64_t rows = 1100, cols = 8300;
    const auto [x, t] = inputs(rows, cols, dt, false, false);
    compare(x, t, "row", false, str(dt, " row ", rows, "x", cols));
    const auto all = std::get<0>(emulated(x, t, "row", false, true, false));
    for (const int64_t r : {0, 255, 256, 600, 768, 1023, 1024, 1099}) {
      const auto alone = std::get<0>(emulated(x.narrow(0, r, 1), t.narrow(0, r, 1), "row", false, true, false));
      check_bitwise(all.narrow(0, r, 1), alone, str(dt, " row ", r, " of ", rows, " alone vs in its batch"));
    }
  }
}

// The loss does not depend on the grid: tile sums are added in one order by
// whichever block finishes last.
void test_grid_independence() {
  for (const auto dt : {at::kFloat, at::kDouble}) {
    const auto [x, t] = inputs(300, 8300, dt, false, false);
    for (const auto& red : {std::string("sum"), std::string("batchmean"), std::string("row")}) {
      g_sms = 1;
      const auto a = emulated(x, t, red, false, true, true);
      g_sms = 5;
      const auto b = emulated(x, t, red, false, true, true);
      check_bitwise(std::get<0>(a), std::get<0>(b), str(dt, " ", red, " loss, 8 blocks vs 40"));
      check_bitwise(std::get<1>(a), std::get<1>(b), str(dt, " ", red, " grad_input, 8 blocks vs 40"));
    }
  }
  g_sms = 2;
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_modes_dtypes_shapes();
  test_layouts();
  test_none_backward();
  test_row_epilogue();
  test_grid_independence();
  std::printf("test_kl_emulated: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
