// The CUDA kernel of `batchkl::kl_with_logits` (csrc/cuda/kl_logits_kernel.cuh)
// run on the CPU by tests/cpp/cuda_emulator.h, so that its logic is tested
// on machines without a GPU (CI's): every launch shape it has (a warp per
// row; a CTA per row, the row staged in shared memory or streamed twice; a
// cluster of 2-8 CTAs per row trading their totals through distributed
// shared memory), the 16-byte and the element-wise paths, masks,
// num_items_in_batch, the zero-probability rule and NaN rows, against the
// CPU kernel in float64 (and for special values, in the inputs' dtype), and
// bitwise: staged vs streamed, a row alone vs in its batch.
//
// Built into one executable with the host code and the CPU kernel (not
// linked to libbatchkl: this executable is its own copy of the library's
// registrations). Prints every failed check; exits non-zero if there was one.
#include "cuda_emulator.h"
// (first: it defines what the kernel header expects of CUDA)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <array>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "check_close.h"
#include "cuda/kl_logits_kernel.cuh"
#include "kl_logits.h"

namespace {

using batchkl::LogitsLaunch;
using namespace batchkl::logits_cuda;

using batchkl_test::check;
using batchkl_test::check_close;
using batchkl_test::g_checks;
using batchkl_test::g_failures;
using c10::str;

// The GPU the emulated launcher pretends to be.
DeviceLimits g_device;
// Whether every launch merges a row's maxes and sums in one exchange
// (LaunchKnobs::merge), whatever g_device says: main() runs the tests again
// with it.
bool g_merge = false;
// Whether every launch runs all its sweeps forward (LaunchKnobs::reuse 0),
// likewise.
bool g_forward = false;
// Whether every launch double-buffers the distillation kernel's rows
// (LaunchKnobs::prefetch), likewise; and how many clusters the emulated GPU
// holds at once (the launcher's occupancy query), so that a persistent grid
// takes several rows per cluster. g_single_stage: a plan with Grid::prefetch
// runs as the launcher's fallback does (single_stage: the kDistill kernel, a
// cluster per row, the same slices).
bool g_prefetch = false;
int64_t g_resident = 2;
bool g_single_stage = false;
// Which grids the emulated GPU can hold (the launcher's occupancy query,
// which settle_plan asks); unset: all.
std::function<bool(const Grid&)> g_fits;

// What kl_logits_cuda.cu's launcher does, with host memory and the emulator.
template <typename scalar_t, batchkl::Divergence kDiv, bool kProbs>
void launch_typed(const LogitsLaunch& p) {
  DeviceLimits dev = g_device;
  dev.knobs.merge = dev.knobs.merge || g_merge;
  if (g_forward) dev.knobs.reuse = 0;
  dev.knobs.prefetch = dev.knobs.prefetch || g_prefetch;
  const bool distill = use_distill_kernel(dev.knobs, p);
  const PlanFor plan = plan_for(dev.knobs, p);
  Grid grid = plan_grid(p.geo.rows, p.geo.cols, sizeof(scalar_t), dev, plan);
  if (!grid.warp_rows) {
    grid = settle_plan(grid, p.geo.rows, p.geo.cols, sizeof(scalar_t), dev, plan,
                       [](const Grid& g) { return !g_fits || g_fits(g); });
  }
  if (grid.prefetch && g_single_stage) single_stage(grid, p.geo.rows, sizeof(scalar_t));
  if (grid.prefetch) cut_to_resident(grid, p.geo.rows, g_resident);
  unsigned ticket = 0;
  unsigned long long kept = 0;
  std::vector<double> workspace(p.row_out == nullptr ? p.geo.rows : 0);
  double* row_loss = p.row_out != nullptr ? p.row_out : workspace.data();
  if (p.divide_by_kept_rows) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((p.geo.rows + kThreads - 1) / kThreads, 4));
    batchkl_emu::launch(blocks, kThreads, 0, 1, count_kept_kernel<>, p.mask, p.geo.rows, &kept);
  }
  const unsigned long long* kept_ptr = &kept;
  batchkl_emu::launch(static_cast<unsigned>(grid.blocks), kThreads, grid.smem, grid.warp_rows ? 1 : grid.cluster,
                      logits_kernel_of<scalar_t>(p, distill, grid.prefetch), p, grid, row_loss, &ticket, kept_ptr);
}

void launch_emulated(const LogitsLaunch& p) {
  batchkl::dispatch_logits(p, [&](auto div, auto probs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "emulated", [&] {
      launch_typed<scalar_t, decltype(div)::value, decltype(probs)::value>(p);
    });
  });
}

using Result = batchkl::FusedResult;

struct Call {
  double beta = 0.0;
  double temperature = 1.0;
  std::string reduction = "batchmean";
  std::optional<at::Tensor> mask;
  std::optional<at::Tensor> num_items;
  bool probs = false;
  bool grad_input = true;
  bool grad_target = true;
};

Result emulated(const at::Tensor& x, const at::Tensor& t, const Call& c) {
  return batchkl::kl_with_logits_fused_impl(x, t, c.beta, c.temperature, c.reduction, c.mask, c.num_items, c.probs,
                                            std::nullopt, c.grad_input, c.grad_target, launch_emulated);
}

Result cpu_kernel(const at::Tensor& x, const at::Tensor& t, const Call& c) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("batchkl::kl_with_logits_fused", "")
                       .typed<Result(const at::Tensor&, const at::Tensor&, double, double, c10::string_view,
                                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool,
                                     bool, std::optional<at::ScalarType>)>();
  return op.call(x, t, c.beta, c.temperature, c.reduction, c.mask, c.num_items, c.probs, c.grad_input,
                 c.grad_target, std::nullopt);
}

void check_bitwise(const Result& a, const Result& b, const std::string& what) {
  const std::array<const at::Tensor*, 4> u{&std::get<0>(a), &std::get<1>(a), &std::get<2>(a), &std::get<3>(a)};
  const std::array<const at::Tensor*, 4> v{&std::get<0>(b), &std::get<1>(b), &std::get<2>(b), &std::get<3>(b)};
  for (int k = 0; k < 4; ++k) {
    check(batchkl_test::same_values(*u[k], *v[k]), str(what, ": output ", k, " not bitwise equal"));
  }
}

// A fused result's gradient (1: input, 2: target) in float64, times its
// factor where the kernel gave one (float16 gradients of the sum).
at::Tensor true_grad(const Result& r, int k) {
  const at::Tensor g = (k == 1 ? std::get<1>(r) : std::get<2>(r)).to(at::kDouble);
  const at::Tensor& scale = std::get<3>(r);
  return scale.numel() == 0 ? g : g * scale.to(at::kDouble);
}

double rtol_for(at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return 1e-11;
    case at::kFloat: return 2e-5;
    case at::kBFloat16: return 1.6e-2;
    default: return 2e-3;
  }
}

// The gradient's small elements carry the rounding of the row's larger ones.
double atol_for(at::ScalarType dt) { return dt == at::kDouble ? 1e-12 : dt == at::kFloat ? 1e-5 : 4e-3; }

// Two emulated results of the same call under other launch settings: loss
// and the gradients computed, to the dtype's tolerances.
void check_results_close(const Result& a, const Result& b, at::ScalarType dt, bool grad_target,
                         const std::string& what) {
  const double rtol = rtol_for(dt), atol = atol_for(dt);
  check_close(std::get<0>(a), std::get<0>(b), rtol, atol, what + " loss");
  check_close(std::get<1>(a), std::get<1>(b), rtol, atol, what + " grad input");
  if (grad_target) check_close(std::get<2>(a), std::get<2>(b), rtol, atol, what + " grad target");
}

// The emulated call's result, or none where it threw (a failed check).
std::optional<Result> emulated_or_fail(const at::Tensor& x, const at::Tensor& t, const Call& c,
                                       const std::string& what) {
  try {
    return emulated(x, t, c);
  } catch (const std::exception& ex) {
    check(false, str(what, ": emulated kernel threw ", ex.what()));
    return std::nullopt;
  }
}

// Against the CPU kernel in float64 on the very same values (the exact
// result to a few ulp of float64): the tolerance is then the emulated
// kernel's own rounding. (Against the CPU kernel in float, two roundings of
// similar size add up: its JSD gradients alone come within half of the
// float tolerance of float64.) The outputs keep the inputs' dtype.
// `in_float64` false: against the CPU kernel in the inputs' dtype, for the
// special values, whose rules (a probability that underflows is 0) hold in
// the dtype computed in. `loosen` widens the tolerances where a thread adds
// up a longer run of its row in sequence. `grad_floor`: an absolute
// tolerance for the gradients, for rows whose largest gradient is itself the
// remainder of a cancellation (JSD where both distributions put nearly all
// their mass on one entry each: q (log(q / m) - KL) at q = 1, m = 1/2).
// `skip_grad_rows` (bool, one per row): rows whose gradients are not
// compared (a divergence of +inf has no gradient to compare).
// Returns both results (emulated, CPU), none where the emulated call threw.
std::optional<std::pair<Result, Result>> compare_with_cpu(const at::Tensor& x, const at::Tensor& t, const Call& c,
                                                          const std::string& what, bool in_float64 = true,
                                                          double loosen = 1.0, double grad_floor = 0.0,
                                                          const std::optional<at::Tensor>& skip_grad_rows = std::nullopt) {
  const auto run = emulated_or_fail(x, t, c, what);
  if (!run) return std::nullopt;
  const Result& e = *run;
  const auto dt = x.scalar_type();
  const auto ref_dtype = in_float64 ? at::kDouble : dt;
  const Result r = cpu_kernel(x.contiguous().to(ref_dtype), t.contiguous().to(ref_dtype), c);
  check(std::get<0>(e).scalar_type() == dt && std::get<1>(e).scalar_type() == dt &&
            std::get<2>(e).scalar_type() == dt,
        what + ": outputs in the inputs' dtype");
  const double rtol = rtol_for(dt) * loosen, atol = atol_for(dt) * loosen;
  // A loss that is 0 (identical rows; a single column) comes out as the
  // rounding of its terms, each of order 1, in the accumulation type.
  const double floor = dt == at::kDouble ? 1e-14 : 1e-6;
  const auto wide = [](const at::Tensor& v) { return v.to(at::kDouble); };
  check_close(wide(std::get<0>(e)), wide(std::get<0>(r)), rtol, atol, what + " loss", floor, dt);
  // Rows left out of the gradients' comparison: 0 on both sides.
  const auto grads_of = [&](const at::Tensor& g) {
    auto w = wide(g);
    if (!skip_grad_rows) return w;
    const auto keep = skip_grad_rows->logical_not().reshape({-1, 1}).expand({skip_grad_rows->numel(), x.size(-1)});
    return at::where(keep.reshape(w.sizes()), w, at::zeros_like(w));
  };
  if (c.grad_input) {
    check_close(grads_of(true_grad(e, 1)), grads_of(true_grad(r, 1)), rtol, atol, what + " grad_input", grad_floor,
                dt);
  }
  if (c.grad_target) {
    check_close(grads_of(true_grad(e, 2)), grads_of(true_grad(r, 2)), rtol, atol, what + " grad_target", grad_floor,
                dt);
  }
  return std::pair{e, r};
}

// The gradients' zeros carry the CPU kernel's signs: +0 for a probability
// of 0, where a product of it would give -0 (RowWork::times_prob). A value
// comparison takes -0 for +0. `both`: compare_with_cpu's results, the CPU
// kernel's in the inputs' dtype.
void check_zero_signs(const std::pair<Result, Result>& both, const Call& c, const std::string& what) {
  const auto& [run, r] = both;
  for (const int k : {1, 2}) {
    if (!(k == 1 ? c.grad_input : c.grad_target)) continue;
    const at::Tensor e = (k == 1 ? std::get<1>(run) : std::get<2>(run)).to(at::kDouble);
    const at::Tensor ref = (k == 1 ? std::get<1>(r) : std::get<2>(r)).to(at::kDouble);
    const at::Tensor zeros = e.eq(0).logical_and(ref.eq(0));
    const int64_t off = e.signbit().ne(ref.signbit()).logical_and(zeros).sum().item<int64_t>();
    check(off == 0, str(what, ": ", off, " of the ", zeros.sum().item<int64_t>(), " zeros of gradient ", k,
                        " with the other sign than the CPU kernel's"));
  }
}

at::Tensor logits(int64_t rows, int64_t cols, at::ScalarType dt, double scale = 3.0) {
  return (at::randn({rows, cols}, at::kDouble) * scale).to(dt);
}

// Row r of float64 logits gets the student's -inf where the teacher's
// probability underflows to 0: 0 * inf in the forward KL's lean sweep, whose
// thread then sums its loss again exactly. Column 1 is made finite, so that
// the row's loss stays finite where a caller filled that column with -inf.
void lean_resum_row(at::Tensor& x, at::Tensor& t, int64_t r) {
  x[r][1] = 0.5;
  x[r][3] = -std::numeric_limits<double>::infinity();
  t[r][3] = -200;
}

// The same values in another memory layout.
at::Tensor layout(const at::Tensor& v, const std::string& kind) {
  const int64_t rows = v.size(0), cols = v.size(1);
  if (kind == "misaligned") {  // every row starts one element past a 16-byte boundary
    auto big = at::full({rows, cols + 1}, std::numeric_limits<double>::quiet_NaN(), v.options());
    auto view = big.narrow(1, 1, cols);
    view.copy_(v);
    return view;
  }
  if (kind == "strided") {  // last dim strided: the element-wise gather
    auto big = at::full({rows, cols, 2}, std::numeric_limits<double>::quiet_NaN(), v.options());
    auto view = big.select(2, 0);
    view.copy_(v);
    return view;
  }
  if (kind == "lead") {  // two leading dims that do not merge
    if (rows % 2 != 0) return v;
    auto big = at::empty({rows / 2, 2, cols}, v.options());
    auto view = big.transpose(0, 1);  // (2, rows / 2, cols)
    view.copy_(v.reshape({2, rows / 2, cols}));
    return view;
  }
  return v;
}

const std::vector<std::pair<std::string, DeviceLimits>> kDevices = {
    {"A100-like (no clusters)", DeviceLimits{4, 163 * 1024, false}},
    {"H100-like (clusters)", DeviceLimits{4, 227 * 1024, true}},
    {"small shared memory (streamed rows)", DeviceLimits{4, 8 * 1024, true}},
};

void test_shapes_dtypes_divergences() {
  // 40003: the last CTA of a cluster gets a shorter slice, ending in a partial pack.
  // 4096: 16-bit rows' last on a warp (kWarpRowBytes), a CTA's in float32 and float64.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{5, 37},    {3, 1},     {9, 2048},  {2, 2049},
                                                           {3, 4096},  {2, 4097},  {3, 5000},  {2, 40000},
                                                           {2, 40003}};
  for (const auto& [dev_name, dev] : kDevices) {
    g_device = dev;
    for (const auto dt : {at::kFloat, at::kBFloat16, at::kDouble, at::kHalf}) {
      for (const auto& [rows, cols] : shapes) {
        const auto x = logits(rows, cols, dt), t = logits(rows, cols, dt);
        for (const double beta : {0.0, 0.3, 1.0}) {
          Call c;
          c.beta = beta;
          c.reduction = cols == 5000 ? "none" : "batchmean";
          c.temperature = cols == 37 ? 2.0 : 1.0;
          compare_with_cpu(x, t, c, str(dev_name, " ", dt, " ", rows, "x", cols, " beta=", beta, " ", c.reduction));
          if (beta != 0.3) {
            // The student's gradient alone: the forward KL's lean sweep.
            c.grad_target = false;
            compare_with_cpu(x, t, c, str(dev_name, " ", dt, " ", rows, "x", cols, " beta=", beta, " ", c.reduction,
                                          " student's gradient alone"));
          }
        }
      }
    }
  }
}

void test_layouts_reductions_masks() {
  g_device = kDevices[1].second;
  const auto dt = at::kFloat;
  for (const int64_t cols : {37, 3001, 40000}) {
    const auto x = logits(6, cols, dt), t = logits(6, cols, dt);
    for (const std::string kind : {"misaligned", "strided", "lead"}) {
      for (const double beta : {0.0, 0.5, 1.0}) {
        Call c;
        c.beta = beta;
        compare_with_cpu(layout(x, kind), layout(t, kind), c, str("layout ", kind, " V=", cols, " beta=", beta));
      }
    }
    auto mask = at::rand({6}) < 0.6;
    mask[0] = true;
    mask[5] = false;
    for (const std::string red : {"none", "sum", "mean", "batchmean"}) {
      for (const double beta : {0.0, 0.5, 1.0}) {
        Call c;
        c.beta = beta;
        c.reduction = red;
        c.mask = mask;
        c.grad_target = beta != 1.0;  // also the gradient w.r.t. input alone
        compare_with_cpu(x, t, c, str("mask V=", cols, " ", red, " beta=", beta));
        Call n = c;
        n.mask = std::nullopt;
        n.num_items = at::scalar_tensor(7.0, at::kDouble);
        compare_with_cpu(x, t, n, str("num_items V=", cols, " ", red, " beta=", beta));
      }
    }
    Call none_kept;
    none_kept.mask = at::zeros({6}, at::kBool);
    compare_with_cpu(x, t, none_kept, str("mask keeping no row V=", cols));
  }
}

// A thread sees the same values in the same order whether its packs move as
// whole 16-byte accesses (the fast loops; asynchronously staged, for
// contiguous aligned rows) or element by element: bitwise the same results
// for every layout. V = 1500 runs a warp per row, with whole sweep-1 steps
// of the fast loop and a rest (3001 too in bfloat16); 3001 (float32) and
// 5001 one CTA per row, staged through registers where the layout allows no
// cp.async; 40000 whole steps on a CTA; 40003 adds a partial last pack to
// them, and its odd rows start off a 16-byte boundary.
// ('sum': 'batchmean' divides by size(0), which "lead" changes.)
void test_layouts_bitwise() {
  // Staged slices; streamed ones, whose later sweeps run backward (the rest
  // of a thread's packs before its steps).
  for (const int device : {1, 2}) {
  g_device = kDevices[device].second;
  for (const int64_t cols : {37, 1500, 3001, 5001, 40000, 40003}) {
    for (const auto dt : {at::kFloat, at::kBFloat16}) {
      const auto x = logits(6, cols, dt), t = logits(6, cols, dt);
      for (const std::string kind : {"misaligned", "strided", "lead"}) {
        for (const double beta : {0.0, 0.5}) {  // two sweeps, and three
          Call c;
          c.beta = beta;
          c.reduction = "sum";
          auto [loss, gx, gt, gs] = emulated(layout(x, kind), layout(t, kind), c);  // "lead": (2, 3, V)
          check_bitwise({loss, gx.reshape(x.sizes()), gt.reshape(x.sizes()), gs}, emulated(x, t, c),
                        str(kDevices[device].first, ": layout ", kind, " vs contiguous V=", cols, " beta=", beta, " ",
                            dt));
        }
      }
    }
  }
  }
  g_device = kDevices[1].second;
}

void test_probs_mode() {
  for (const auto& [dev_name, dev] : kDevices) {
    g_device = dev;
    for (const int64_t cols : {50, 9000}) {
      auto x = at::rand({4, cols}, at::kDouble).to(at::kFloat);
      auto t = at::rand({4, cols}, at::kDouble).to(at::kFloat);
      x.select(1, 3).zero_();  // exact zeros: the zero-probability rule
      // Where the student's probability is 0, a teacher's that is subnormal
      // (about 1e-40): the gradient w.r.t. it divides its term by it, so it
      // does not shrink with p, and JSD from logits' floor on m would make
      // it wrong.
      t.select(1, 3).copy_(t.sum(1) * 1e-40);
      for (const double beta : {0.0, 0.5, 1.0}) {
        Call c;
        c.beta = beta;
        c.probs = true;
        c.reduction = "none";
        compare_with_cpu(x, t, c, str(dev_name, " probs V=", cols, " beta=", beta));
      }
    }
  }
}

void test_special_values() {
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto& [dev_name, dev] : kDevices) {
    g_device = dev;
    for (const int64_t cols : {33, 12000}) {
      auto x = logits(11, cols, at::kDouble), t = logits(11, cols, at::kDouble);
      x.select(1, 1).fill_(-inf);                      // student masks an entry
      t.select(1, 2).fill_(-inf);                      // teacher masks an entry
      x.select(1, 4).fill_(-inf);
      t.select(1, 4).fill_(-inf);                      // both: probability 0 on both sides
      x[1][cols / 2] = std::numeric_limits<double>::quiet_NaN();  // a NaN row
      t[2][cols - 1] = inf;                            // a +inf logit: NaN row
      x[3].fill_(-inf);                                // a row of -inf only: NaN
      x[5][0] = inf;                                   // the student's +inf, in the first pack
      t[6][cols / 3] = std::numeric_limits<double>::quiet_NaN();  // the teacher's NaN
      t[7].fill_(-inf);                                // the teacher's row of -inf only
      x[8][cols - 1] = -inf;                           // -inf and +inf in one row
      x[8][cols / 2] = inf;
      // A NaN in a pack whose thread has seen nothing but -inf and NaN so far
      // (the max skips NaN): the last column alone in its pack (33 = 4 * 8 +
      // 1), and the first pack of a row.
      x[9][cols - 1] = std::numeric_limits<double>::quiet_NaN();
      t[10].narrow(0, 0, 8).fill_(std::numeric_limits<double>::quiet_NaN());
      lean_resum_row(x, t, 0);  // column 1's student -inf put back
      // The student's -inf where the teacher's probability is 1.67e-38,
      // just above FLT_MIN: JSD's mixture m = p / 2 there is subnormal,
      // which its log must not take for 0 (the SFU flushes it: an infinite
      // loss). (A bfloat16 logit near -75 is off by at most 0.25, which
      // keeps p between 1.3e-38 and 2.1e-38.)
      x[4][5] = -inf;
      t[4][5] = -inf;
      t[4][5] = at::logsumexp(t[4], 0).item<double>() + std::log(1.67e-38);
      for (const auto dt : {at::kFloat, at::kBFloat16}) {
        for (const double beta : {0.0, 0.5, 1.0}) {
          // Both gradients (a third sweep for the KLs), the student's alone
          // (the forward KL's lean sweep), none.
          for (const auto& [gi, gt] : {std::pair{true, true}, std::pair{true, false}, std::pair{false, false}}) {
            Call c;
            c.beta = beta;
            c.reduction = "none";
            c.grad_input = gi;
            c.grad_target = gt;
            const auto what = str(dev_name, " special values V=", cols, " ", dt, " beta=", beta, " grads=", gi, gt);
            if (const auto both = compare_with_cpu(x.to(dt), t.to(dt), c, what, false)) check_zero_signs(*both, c, what);
          }
          Call c;
          c.beta = beta;
          c.reduction = "none";
          Call m = c;
          auto mask = at::ones({11}, at::kBool);
          mask[1] = false;  // the NaN row, excluded: 0 whatever it holds
          m.mask = mask;
          m.reduction = "batchmean";
          compare_with_cpu(x.to(dt), t.to(dt), m, str(dev_name, " masked NaN row V=", cols, " ", dt, " beta=", beta),
                           false);
        }
      }
    }
  }
}

// Staging only changes where sweeps 2-3 read from (and, by default, their
// direction); the cluster split and everything else depends on the row
// length: bitwise the same with the sweeps in one direction.
void test_staged_equals_streamed() {
  // 20001: rows off 16-byte boundaries (the staging copy peels them, the
  // streamed sweeps load element by element).
  for (const int64_t cols : {20000, 20001}) {
    for (const bool clusters : {false, true}) {
      for (const auto dt : {at::kFloat, at::kBFloat16}) {
        const auto x = logits(3, cols, dt), t = logits(3, cols, dt);
        for (const double beta : {0.0, 0.5}) {
          Call c;
          c.beta = beta;
          c.reduction = "none";
          g_device = DeviceLimits{4, 227 * 1024, clusters};
          const Result staged = emulated(x, t, c);
          check(plan_grid(3, cols, at::elementSize(dt), g_device).stage, "staged plan");
          g_device = DeviceLimits{4, 4 * 1024, clusters};
          check(!plan_grid(3, cols, at::elementSize(dt), g_device).stage, "streamed plan");
          // Streamed rows alternate their sweeps' direction by default (the
          // staged ones do not): the same order here.
          g_device.knobs.reuse = 0;
          check_bitwise(staged, emulated(x, t, c), str("staged vs streamed V=", cols, " clusters=", clusters, " ", dt));
        }
      }
    }
  }
}

// The launch knobs that switch the forward KL's distillation kernel, its lean
// sweep and the cluster's loss shares off (for measuring them): the lean sweep
// in the general kernel gives the distillation kernel's bits, the general
// sweep agrees with the CPU kernel, and the all-reduced loss adds the same
// shares in the same order.
void test_lean_and_share_knobs() {
  for (const int64_t cols : {512, 40003}) {
    for (const auto dt : {at::kFloat, at::kBFloat16}) {
      const auto x = logits(3, cols, dt), t = logits(3, cols, dt);
      for (const char* red : {"none", "sum"}) {
        Call c;
        c.reduction = red;
        c.grad_target = false;
        g_device = DeviceLimits{4, 227 * 1024, true};
        g_device.knobs.stage = StageMode::kWhereFits;  // one plan for both kernels
        g_device.knobs.lean = 1;
        const Result lean = emulated(x, t, c);
        g_device.knobs.lean = 2;  // the same sweeps in the distillation kernel: the same bits
        check_bitwise(lean, emulated(x, t, c), str("distillation kernel V=", cols, " ", dt, " ", red));
        g_device.knobs.lean = 0;
        compare_with_cpu(x, t, c, str("general sweep V=", cols, " ", dt, " ", red));
        const Result general = emulated(x, t, c);
        check_close(std::get<0>(general), std::get<0>(lean), rtol_for(dt), 1e-6, str("lean vs general loss V=", cols));
        // The general kernel's two sweeps on streamed rows (the writing one backward).
        for (const int lean_knob : {0, 1}) {
          g_device = kDevices[2].second;
          g_device.knobs.lean = lean_knob;
          compare_with_cpu(x, t, c, str("streamed, lean=", lean_knob, " V=", cols, " ", dt, " ", red));
        }
        g_device = DeviceLimits{4, 227 * 1024, true};
        const Result shares = emulated(x, t, c);
        g_device.knobs.share = false;
        check_bitwise(shares, emulated(x, t, c), str("shares vs all-reduce V=", cols, " ", dt, " ", red));
        // JSD from logits: its general sweeps under lean=0, its lean ones
        // (jsd_step) otherwise, each against the CPU kernel, both gradients
        // and the student's alone, staged and streamed.
        for (const bool grad_target : {true, false}) {
          Call j = c;
          j.beta = 0.3;
          j.grad_target = grad_target;
          for (const int dev : {1, 2}) {
            for (const int lean_knob : {0, 1, 3}) {
              g_device = kDevices[dev].second;
              g_device.knobs.lean = lean_knob;
              compare_with_cpu(x, t, j, str("JSD lean=", lean_knob, " gt=", grad_target, " ", kDevices[dev].first,
                                            " V=", cols, " ", dt, " ", red));
            }
          }
        }
      }
    }
  }
}

// LaunchKnobs::keep: JSD from logits on staged rows where only the student's
// gradient is written takes it from the log-ratios that the totals sweep
// kept in the target's place in shared memory. Under 1 (the default)
// float32 and float64 rows do, with the bits of 0 (none kept); bfloat16 rows
// do under 2 alone, as float16: the same loss, gradients that agree with the
// CPU kernel's and differ in a few bits from 0's; float16 rows never. On a CTA per row and a
// cluster, aligned, misaligned (staged through registers) and strided rows,
// in the general kernel (LEAN=1), JSD's kDistill kernel (LEAN=3) and its
// double-buffered twin (one cluster taking every row, so that stages that
// kept log-ratios take later rows' bulk copies, which the emulator checks
// for writes in flight); counted, so that a path that never runs cannot pass.
// Rows that keep nothing: streamed ones, the target's gradient asked for, the
// loss alone.
void test_keep_knob() {
  // 5000: every row 16-byte aligned (bulk copies in the kAhead kernel);
  // 5001: a partial last pack, and rows after the first off 16 bytes.
  const std::vector<std::pair<int64_t, std::string>> cases = {{5000, "contiguous"},
                                                              {5001, "contiguous"},
                                                              {5000, "misaligned"},
                                                              {5000, "strided"},
                                                              {40003, "contiguous"}};
  bool bf16_bits_differ = false;
  int n = 0;
  for (const auto& [cols, kind] : cases) {
    for (const auto dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
      const auto x = layout(logits(6, cols, dt), kind), t = layout(logits(6, cols, dt), kind);
      const bool exact = dt == at::kFloat || dt == at::kDouble;
      for (const auto& [lean, prefetch] : std::vector<std::pair<int, bool>>{{1, false}, {3, false}, {3, true}}) {
        Call c;
        c.beta = std::array<double, 3>{0.1, 0.5, 0.9}[n % 3];
        c.reduction = n % 2 == 0 ? "none" : "batchmean";
        c.grad_target = false;
        ++n;
        const auto what = str("keep V=", cols, " ", kind, " ", dt, " lean=", lean, " prefetch=", prefetch,
                              " beta=", c.beta, " ", c.reduction);
        const auto run = [&](int keep, const Call& call, StageMode stage, uint64_t& kept) {
          g_device = kDevices[1].second;
          g_device.knobs.stage = stage;
          g_device.knobs.lean = lean;
          g_device.knobs.prefetch = prefetch;
          g_device.knobs.keep = keep;
          // One cluster at a time: each takes every row in turn, so that a
          // stage that kept log-ratios takes a later row's bulk copy.
          g_resident = prefetch ? 1 : 2;
          const uint64_t before = batchkl_emu::kept_rows;
          auto r = emulated_or_fail(x, t, call, str(what, " keep=", keep));
          kept = batchkl_emu::kept_rows - before;
          g_resident = 2;
          return r;
        };
        uint64_t kept = 0;
        const auto none = run(0, c, StageMode::kWhereFits, kept);
        if (!none) continue;
        check(kept == 0, what + ": keep=0 kept log-ratios");
        for (const int keep : {1, 2}) {
          const auto got = run(keep, c, StageMode::kWhereFits, kept);
          if (!got) continue;
          const bool applies = exact || (keep == 2 && dt == at::kBFloat16);
          check(applies ? kept > 0 : kept == 0, str(what, " keep=", keep, ": ", kept, " rows kept log-ratios"));
          if (!applies || exact) {
            check_bitwise(*none, *got, str(what, " keep=", keep, " vs keep=0"));
            continue;
          }
          check(batchkl_test::same_values(std::get<0>(*none), std::get<0>(*got)),
                str(what, " keep=", keep, ": the loss is the totals sweep's, the same"));
          bf16_bits_differ = bf16_bits_differ || !batchkl_test::same_values(std::get<1>(*none), std::get<1>(*got));
          compare_with_cpu(x, t, c, str(what, " keep=", keep));  // g_device as run() left it
        }
        // Nothing kept: streamed rows, both gradients, the loss alone.
        Call both = c, loss_only = c;
        both.grad_target = true;
        loss_only.grad_input = false;
        for (const auto& [call, stage] : std::vector<std::pair<Call, StageMode>>{
                 {c, StageMode::kNever}, {both, StageMode::kWhereFits}, {loss_only, StageMode::kWhereFits}}) {
          run(2, call, stage, kept);
          check(kept == 0, str(what, ": ", kept, " rows kept log-ratios streamed, or with the target's gradient, "
                                             "or for the loss alone"));
        }
      }
    }
  }
  check(bf16_bits_differ, "keep=2: bfloat16 rows' gradients from float16 log-ratios differ nowhere from keep=0's");
  g_device = kDevices[1].second;
}

// JSD and reverse KL from logits in distillation kernels
// (BATCHKL_LOGITS_LEAN=3): the student's gradient alone (or none) takes a
// kDistill kernel, compiled with those sweeps only, and gives the general
// kernel's bits (the same sweeps and sums, in the same plan) at every launch
// shape: short rows, a CTA or a cluster per row, staged and streamed; with a
// mask, and against the CPU kernel. The other cases keep their kernels.
void test_three_sweep_distill_kernels() {
  LogitsLaunch jsd;
  jsd.div = batchkl::Divergence::kJSD;
  LaunchKnobs three;
  three.lean = 3;
  const LaunchKnobs two;  // the default
  check(use_distill_kernel(three, jsd) && !use_distill_kernel(two, jsd) && plan_for(three, jsd) == PlanFor::kThreeSweep &&
            plan_for(two, jsd) == PlanFor::kGeneral,
        "JSD from logits: the kDistill kernel under lean=3 alone, with the general kernel's plan");
  check(logits_kernel_of<float>(jsd, true) != logits_kernel_of<float>(jsd, false) &&
            logits_kernel_of<float>(jsd, true) == (logits_kernel<float, batchkl::Divergence::kJSD, false, true>),
        "JSD from logits: lean=3 launches a kernel of its own");
  LogitsLaunch with_target = jsd;
  with_target.want_grad_target = true;
  LogitsLaunch on_probs = jsd;
  on_probs.probs = true;
  LogitsLaunch reverse = jsd;
  reverse.div = batchkl::Divergence::kReverse;
  check(use_distill_kernel(three, reverse) && !use_distill_kernel(two, reverse) && plan_for(three, reverse) == PlanFor::kThreeSweep &&
            logits_kernel_of<float>(reverse, true) ==
                (logits_kernel<float, batchkl::Divergence::kReverse, false, true>),
        "reverse KL from logits: a kDistill kernel of its own under lean=3 alone, with the general kernel's plan");
  check(logits_kernel_of<float>(jsd, true, true) == (logits_kernel<float, batchkl::Divergence::kJSD, false, true, true>) &&
            logits_kernel_of<float>(reverse, true, true) ==
                (logits_kernel<float, batchkl::Divergence::kReverse, false, true, true>),
        "lean=3 with copies ahead: JSD's and reverse KL's kAhead twins");
  check(!use_distill_kernel(three, with_target) && !use_distill_kernel(three, on_probs),
        "lean=3: the target's gradient and probabilities keep the general kernel");
  LogitsLaunch forward = jsd;
  forward.div = batchkl::Divergence::kForward;
  check(use_distill_kernel(three, forward) && plan_for(three, forward) == PlanFor::kDistill,
        "lean=3: the forward KL keeps its distillation kernel and plan");

  for (const int64_t cols : {int64_t{700}, int64_t{5000}, int64_t{40003}}) {
    for (const auto dt : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
      const auto x = logits(3, cols, dt), t = logits(3, cols, dt);
      for (const auto& [dev_name, dev] : kDevices) {
        for (const double beta : {0.5, 0.2, 1.0}) {
          for (const bool grad_input : {true, false}) {
            for (const char* red : {"none", "batchmean"}) {
              Call c;
              c.beta = beta;
              c.temperature = 1.5;
              c.reduction = red;
              c.grad_input = grad_input;
              c.grad_target = false;
              if (std::string(red) == "batchmean") c.mask = at::tensor({1, 0, 1}, at::kLong).to(at::kBool);
              const auto what = str("JSD / reverse KL in a distillation kernel, ", dev_name, " V=", cols, " ", dt,
                                    " beta=", beta, " gx=", grad_input, " ", red);
              g_device = dev;
              const Result general = emulated(x, t, c);
              g_device.knobs.lean = 3;
              const auto distilled = emulated_or_fail(x, t, c, what);
              if (distilled) check_bitwise(general, *distilled, what);
              if (dt == at::kFloat && grad_input) compare_with_cpu(x, t, c, what);
            }
          }
        }
      }
      // With the target's gradient, lean=3 changes nothing.
      for (const double beta : {0.5, 1.0}) {
        Call c;
        c.beta = beta;
        c.reduction = "none";
        g_device = kDevices[1].second;
        const Result general = emulated(x, t, c);
        g_device.knobs.lean = 3;
        check_bitwise(general, emulated(x, t, c),
                      str("beta=", beta, " with the target's gradient, lean=3, V=", cols, " ", dt));
      }
    }
  }
  g_device = kDevices[1].second;
}

// The maxes and sums merged in one exchange (BATCHKL_LOGITS_MERGE=1) give
// what two exchanges give, to float rounding (the sums are rescaled in
// another order), on every launch shape: lanes of a warp, a CTA, clusters.
void test_merged_exchange() {
  for (const int device : {1, 2}) {  // staged slices; streamed ones, whose sweeps alternate
  for (const int64_t cols : {512, 5000, 40003, 100000}) {
    for (const auto dt : {at::kFloat, at::kBFloat16, at::kDouble}) {
      const auto x = logits(3, cols, dt), t = logits(3, cols, dt);
      for (const double beta : {0.0, 0.5, 1.0}) {
        for (const bool grad_target : {true, false}) {
          Call c;
          c.beta = beta;
          c.reduction = "none";
          c.grad_target = grad_target;
          g_device = kDevices[device].second;
          const Result two = emulated(x, t, c);
          g_device.knobs.merge = true;
          const Result one = emulated(x, t, c);
          const auto what = str(kDevices[device].first, ": merged vs two exchanges V=", cols, " ", dt, " beta=", beta,
                                " gt=", grad_target);
          check_results_close(one, two, dt, grad_target, what);
          check_bitwise(one, emulated(x, t, c), what + " deterministic");
        }
      }
    }
  }
  }
  g_device = kDevices[1].second;
}

// Sweeps 2 and 3 in the direction of sweep 1 (BATCHKL_LOGITS_REUSE=0) or
// alternating (the default) take a thread's packs in another order: the
// same results to float rounding, each deterministic, on every launch
// shape (a warp's rows, a CTA, clusters, staged and streamed) and for every
// sweep count (two; three for JSD and for both KLs' gradients).
void test_sweep_directions() {
  for (const int64_t cols : {512, 5000, 40003, 100000}) {
    for (const auto dt : {at::kFloat, at::kBFloat16}) {
      const auto x = logits(3, cols, dt), t = logits(3, cols, dt);
      for (const double beta : {0.0, 0.5}) {
        for (const bool grad_target : {true, false}) {
          for (const size_t smem : {size_t{227} * 1024, size_t{8} * 1024}) {
            Call c;
            c.beta = beta;
            c.reduction = "none";
            c.grad_target = grad_target;
            g_device = DeviceLimits{4, smem, true};
            const Result alternating = emulated(x, t, c);
            g_device.knobs.reuse = 0;
            const Result forward = emulated(x, t, c);
            const auto what = str("forward vs alternating sweeps V=", cols, " ", dt, " beta=", beta,
                                  " gt=", grad_target, " smem=", smem / 1024, "K");
            check_results_close(alternating, forward, dt, grad_target, what);
            check_bitwise(forward, emulated(x, t, c), what + " forward deterministic");
            g_device.knobs.reuse = 2;
            check_bitwise(alternating, emulated(x, t, c), what + " alternating deterministic");
            const bool distill = beta == 0.0 && !grad_target;  // the distillation kernel's plan
            const Grid plan =
                plan_grid(3, cols, at::elementSize(dt), g_device, distill ? PlanFor::kDistill : PlanFor::kGeneral);
            if (plan.warp_rows || plan.stage) {
              // Short rows (re-read from L1) and staged slices keep the order.
              check_bitwise(alternating, forward, what + ": the same sweeps");
            } else if (distill) {
              // Two sweeps: each gradient element is a function of its
              // logits and the row constants of sweep 1 (forward in both).
              check(at::equal(std::get<1>(alternating), std::get<1>(forward)),
                    what + ": two sweeps, gradients bitwise equal");
            }
          }
        }
      }
    }
  }
  // The knob reaches the kernel: another order of the sums, other bits for
  // some rows (in float64, whose row losses keep them; float's round them
  // off), in the general kernel (three sweeps) and the distillation one, on
  // streamed rows.
  const auto x = logits(12, 40003, at::kDouble), t = logits(12, 40003, at::kDouble);
  for (const bool grad_target : {true, false}) {
    Call c;
    c.reduction = "none";
    c.grad_target = grad_target;
    g_device = kDevices[2].second;
    const Result alternating = emulated(x, t, c);
    g_device.knobs.reuse = 0;
    check(!at::equal(std::get<0>(alternating), std::get<0>(emulated(x, t, c))),
          str("forward vs alternating sweeps, gt=", grad_target, ": every row loss has the same bits in either order"));
  }
  g_device = kDevices[1].second;
}

// The distillation kernels' rows double-buffered (BATCHKL_LOGITS_PREFETCH=1,
// the kAhead kernels: the forward KL's, and under BATCHKL_LOGITS_LEAN=3
// JSD's and reverse KL's, whose third sweep reads the stage a third time
// and whose row totals take an exchange more), on a grid of 1 or 3 clusters that each take several
// rows in turn, each row coming by bulk copy (a CTA's first before it
// starts, every other during the row before it): bitwise the results of the
// same batch on the same slices staged once, a cluster per row (the
// launcher's fallback), on launch shapes of a CTA and of clusters of 2 to 8,
// and on clusters of 9 to 16 (where the launcher gets them) those of a
// cluster per row of the same kernel, with what stops a
// row from coming by bulk copy: rows off 16 bytes (20002 columns; "lead":
// rows 0-3 aligned, 4-7 not, so the stages alternate between bulk copies
// and staging through registers), a strided layout, rows the mask drops (a
// CTA's last row among them), a NaN row (no writing sweep), the lean
// sweep's exact re-sum (which reads its stage again), partial last packs
// (by the owning thread, beside the bulk copy). Each launch runs four
// times: its first cluster's threads in order and in reverse, its copies
// landing at the wait (a read before it sees NaN) and at once (a copy into
// a stage that a thread has yet to read shows its next row's values).
// (Not shown: races that need a fiber to be switched out between two
// barriers, which the emulator never does.)
// `betas`: the divergences (0 the forward KL, 0.5 JSD, 1 reverse KL).
void test_prefetch(const std::vector<double>& betas) {
  int planned = 0;
  // `ahead`: the kAhead kernel's largest cluster (8, or 16 where the launcher
  // got non-portable sizes); with 16, only plans that take more than 8.
  // `beta`: 0 the forward KL, 0.5 JSD, 1 reverse KL.
  const auto run = [&](double beta, int64_t cols, at::ScalarType dt, const std::string& kind, const at::Tensor& x,
                       const at::Tensor& t, bool grad_input, bool masked, int ahead) {
    Call c;
    c.beta = beta;
    c.reduction = masked ? "sum" : "none";
    c.grad_input = grad_input;
    c.grad_target = false;  // the distillation kernel's case
    if (masked) {
      auto mask = at::ones({8}, at::kBool);
      mask[1] = false;
      mask[5] = false;
      mask[7] = false;  // a CTA's last row: a copy into it would never be waited for
      c.mask = mask.reshape(x.sizes().slice(0, x.dim() - 1));  // "lead": (2, 4)
    }
    g_device = kDevices[1].second;
    g_device.knobs.prefetch = true;
    g_device.knobs.lean = beta == 0.0 ? 2 : 3;
    g_device.max_cluster_ahead = ahead;
    const Grid plan = plan_grid(8, cols, at::elementSize(dt), g_device,
                                beta == 0.0 ? PlanFor::kDistill : PlanFor::kThreeSweep);
    if (!plan.prefetch || (ahead > kMaxCluster && plan.cluster <= kMaxCluster)) return;
    ++planned;
    const auto what = str("prefetch beta=", beta, " V=", cols, " ", dt, " cluster=", plan.cluster, " ", kind, " gi=", grad_input,
                          " masked=", masked);
    uint64_t bulk_rows = 0;  // rows that come by bulk copy (RowWork::bulk_ok)
    for (int r = 0; r < 8; ++r) {
      const auto row_of = [&](const at::Tensor& a) { return a.dim() == 3 ? a[r / 4][r % 4] : a[r]; };
      const bool kept = !masked || (r != 1 && r != 5 && r != 7);
      const bool aligned = reinterpret_cast<uintptr_t>(row_of(x).data_ptr()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(row_of(t).data_ptr()) % 16 == 0;
      bulk_rows += kept && aligned && x.stride(-1) == 1 && t.stride(-1) == 1;
    }
    try {
      // Clusters of more than 8 have no single-stage twin (the kDistill
      // kernel's shares hold 8): a cluster per row of the kAhead kernel
      // itself, each row copied in before it starts, nothing overlapped.
      g_single_stage = plan.cluster <= kMaxCluster;
      g_resident = plan.cluster <= kMaxCluster ? 2 : 8;
      const Result once = emulated(x, t, c);
      g_single_stage = false;
      // 1 cluster: rows 1-7 each copied in during the row before where they
      // can be; 3: rows 0, 3, 6 in one cluster. (2: the "other" part.)
      for (const int64_t resident : {1, 3}) {
        g_resident = resident;
        for (const unsigned order : {0u, 1u, 2u, 3u}) {
          batchkl_emu::launches = order;
          const uint64_t copies = batchkl_emu::bulk_copies;
          check_bitwise(once, emulated(x, t, c),
                        str(what, " clusters=", resident, " reversed=", order % 2, " early=", order / 2));
          // Two per CTA and row that the mask keeps, contiguous and 16-byte aligned.
          const uint64_t issued = batchkl_emu::bulk_copies - copies;
          check(issued == 2 * static_cast<uint64_t>(plan.cluster) * bulk_rows,
                str(what, ": ", issued, " bulk copies, not 2 x ", plan.cluster, " x ", bulk_rows));
        }
      }
    } catch (const std::exception& ex) {
      check(false, str(what, ": emulated kernel threw ", ex.what()));
    }
    g_single_stage = false;
    g_resident = 2;
  };
  // Clusters (stages of 32 KiB): bfloat16 1, 3, 4, 5, 8 CTAs, and with up to
  // 16, 16 (128256); float32 2, 5, 8 (30000), and with up to 16, 10 (40003)
  // and 15 (60000).
  // JSD and reverse KL on fewer of them: 1 and 3 CTAs, 5 and 10, and 16.
  for (const double beta : betas) {
    for (const int64_t cols : {5000, 20002, 30000, 40003, 60000, 128256}) {
      if (beta != 0.0 && (cols == 30000 || cols == 60000)) continue;
      for (const auto dt : {at::kFloat, at::kBFloat16}) {
        if (cols == 128256 && dt == at::kFloat) continue;  // over 16 stages
        auto x = logits(8, cols, at::kDouble), t = logits(8, cols, at::kDouble);
        t[2][cols / 3] = std::numeric_limits<double>::quiet_NaN();  // a NaN row
        for (const int r : {0, 3, 4}) lean_resum_row(x, t, r);
        const auto xd = x.to(dt), td = t.to(dt);
        for (const std::string kind : {"contiguous", "strided", "lead"}) {
          if (kind != "contiguous" && cols != 20002) continue;
          const auto xl = layout(xd, kind), tl = layout(td, kind);
          for (const bool grad_input : {true, false}) {
            for (const bool masked : {false, true}) {
              for (const int ahead : {kMaxCluster, kMaxClusterAhead}) {
                run(beta, cols, dt, kind, xl, tl, grad_input, masked, ahead);
              }
            }
          }
        }
      }
    }
  }
  // 60 configurations for the forward KL, 44 for each of the others.
  int expected = 0;
  for (const double beta : betas) expected += beta == 0.0 ? 60 : 44;
  check(planned == expected, str("prefetch: ", planned, " double-buffered configurations, not ", expected));
  g_device = kDevices[1].second;
}

// Which plans double-buffer rows (plan_grid with LaunchKnobs::prefetch).
void test_prefetch_plans() {
  // Only the distillation kernel's CTA rows that fit 8 stages, on Hopper
  // (bulk copies), in the shared memory there is.
  DeviceLimits h100 = kDevices[1].second, a100 = kDevices[0].second, small = kDevices[2].second;
  h100.knobs.prefetch = a100.knobs.prefetch = small.knobs.prefetch = true;
  check(plan_grid(8, 5000, 4, h100, PlanFor::kDistill).prefetch && !plan_grid(8, 5000, 4, h100, PlanFor::kGeneral).prefetch &&
            !plan_grid(8, 512, 4, h100, PlanFor::kDistill).prefetch && !plan_grid(8, 40003, 4, h100, PlanFor::kDistill).prefetch &&
            plan_grid(8, 30000, 4, h100, PlanFor::kDistill).prefetch && !plan_grid(8, 5000, 4, a100, PlanFor::kDistill).prefetch &&
            !plan_grid(8, 5000, 4, small, PlanFor::kDistill).prefetch,
        "prefetch: the distillation kernel's CTA rows of up to 8 stages, on clusters");
  // The stages: half the slice budget each, both in the CTA's shared memory.
  const Grid g = plan_grid(8, 32000, 2, h100, PlanFor::kDistill);
  check(g.cluster == 4 && g.slice == 8000 && g.stage &&
            g.smem == kAheadFixedSmem + 4 * stage_bytes(8000, 2),
        str("prefetch: bfloat16 rows of 32000 in 4 CTAs of two stages, got ", g.cluster, " CTAs of ", g.slice));
  check(!plan_grid(8, 128256, 2, h100, PlanFor::kDistill).prefetch, "prefetch: bfloat16 rows of 128256 over 8 stages of 32 KiB");
  h100.knobs.slice_budget = 128 * 1024;
  check(plan_grid(8, 128256, 2, h100, PlanFor::kDistill).prefetch && plan_grid(8, 128256, 2, h100, PlanFor::kDistill).cluster == 8,
        "prefetch: BATCHKL_LOGITS_SLICE_KIB=128 double-buffers bfloat16 rows of 128256 over 8 CTAs");
  // Clusters beyond 8 where the launcher got them: rows up to 16 stages.
  h100.max_cluster_ahead = kMaxClusterAhead;
  h100.knobs.slice_budget = kSliceBudget;
  check(plan_grid(8, 128256, 2, h100, PlanFor::kDistill).cluster == 16 && plan_grid(8, 60000, 4, h100, PlanFor::kDistill).cluster == 15 &&
            !plan_grid(8, 128256, 4, h100, PlanFor::kDistill).prefetch && plan_grid(8, 32000, 2, h100, PlanFor::kDistill).cluster == 4,
        "prefetch: clusters of up to 16 where allowed, the fewest CTAs still");
  h100.knobs.slice_budget = 128 * 1024;
  check(plan_grid(8, 256000, 2, h100, PlanFor::kDistill).cluster == 16 && plan_grid(8, 128256, 4, h100, PlanFor::kDistill).cluster == 16,
        "prefetch: stages of 64 KiB in clusters of 16: bfloat16 rows of 256000, float32 of 128256");
  // JSD's and reverse KL's kDistill kernels (PlanFor::kThreeSweep): the same
  // double-buffered plans; where those do not fit, or the knob is off, the
  // general kernel's plan, not the forward KL's streaming rule.
  h100.knobs.slice_budget = kSliceBudget;
  const auto same = [](const Grid& a, const Grid& b) {
    return a.cluster == b.cluster && a.slice == b.slice && a.stage == b.stage && a.prefetch == b.prefetch &&
           a.smem == b.smem && a.blocks == b.blocks && a.backward == b.backward && a.evict_first == b.evict_first;
  };
  for (const int64_t cols : {int64_t{5000}, int64_t{32000}, int64_t{60000}, int64_t{128256}, int64_t{256000}}) {
    for (const int64_t elem : {int64_t{2}, int64_t{4}}) {
      for (const int ahead : {kMaxCluster, kMaxClusterAhead}) {
        h100.max_cluster_ahead = ahead;
        const auto what = str(" (V=", cols, ", ", elem, " bytes, up to ", ahead, ")");
        const Grid d = plan_grid(8, cols, elem, h100, PlanFor::kDistill);
        const Grid t = plan_grid(8, cols, elem, h100, PlanFor::kThreeSweep);
        const Grid general = plan_grid(8, cols, elem, h100);
        check(d.prefetch ? same(t, d) : same(t, general), "prefetch: the three-sweep kernels' plan" + what);
        DeviceLimits off = h100;
        off.knobs.prefetch = false;
        check(same(plan_grid(8, cols, elem, off, PlanFor::kThreeSweep), general),
              "no prefetch: the three-sweep kernels keep the general plan" + what);
      }
    }
  }
  h100.max_cluster_ahead = kMaxCluster;
  check(!plan_grid(8, 128256, 2, h100, PlanFor::kThreeSweep).prefetch &&
            plan_grid(8, 128256, 2, h100, PlanFor::kThreeSweep).stage &&
            !plan_grid(8, 128256, 2, h100, PlanFor::kDistill).stage,
        "prefetch: bfloat16 128256 within 8: JSD staged (the general plan), the forward KL streamed");
  g_device = kDevices[1].second;
}

// The launcher's fallbacks where a plan's clusters cannot be co-resident
// (settle_plan): the kAhead kernel's 16 CTAs planned again within 8, its
// two stages as one (the same bits), a staged slice streamed (the same
// bits), and an error where nothing fits.
void test_settle_plan() {
  DeviceLimits dev = kDevices[1].second;
  dev.knobs.prefetch = true;
  dev.max_cluster_ahead = kMaxClusterAhead;
  const auto settle = [&](int64_t cols, int64_t elem, auto fits) {
    return settle_plan(plan_grid(8, cols, elem, dev, PlanFor::kDistill), 8, cols, elem, dev, PlanFor::kDistill, fits);
  };
  const auto within8 = [](const Grid& g) { return g.cluster <= kMaxCluster; };
  const auto one_stage = [](const Grid& g) { return !g.prefetch; };
  const auto streamed = [](const Grid& g) { return !g.stage; };
  const Grid a = settle(60000, 4, within8), b = settle(32000, 2, one_stage), c = settle(32000, 2, streamed);
  DeviceLimits dev8 = dev;
  dev8.max_cluster_ahead = kMaxCluster;
  const Grid a8 = plan_grid(8, 60000, 4, dev8, PlanFor::kDistill);
  check(a.cluster == a8.cluster && a.slice == a8.slice && a.prefetch == a8.prefetch && a.stage == a8.stage &&
            a.cluster <= kMaxCluster,
        str("settle_plan: float32 60000 in 15 CTAs planned again within 8, got ", a.cluster));
  check(!b.prefetch && b.stage && b.cluster == 4 && b.slice == 8000 &&
            b.smem == kFixedSmem + static_cast<size_t>(2 * stage_bytes(8000, 2)),
        "settle_plan: two stages as one, the same slices");
  check(!c.prefetch && !c.stage && c.cluster == 4 && c.slice == 8000 && c.smem == kFixedSmem && !c.backward,
        "settle_plan: the same slices streamed, sweeps forward");
  std::string what;
  try {
    settle(32000, 2, [](const Grid&) { return false; });
  } catch (const c10::Error& e) {
    what = e.what_without_backtrace();
  }
  // JSD's and reverse KL's kDistill kernels (PlanFor::kThreeSweep): 16
  // stages that cannot be co-resident are planned again within 8, and where
  // 8 stages do not hold the row, as the general kernel's plan (staged),
  // never the forward KL's streaming rule (which streams it in 2 CTAs).
  const Grid j = settle_plan(plan_grid(8, 128256, 2, dev, PlanFor::kThreeSweep), 8, 128256, 2, dev,
                             PlanFor::kThreeSweep, within8);
  check(plan_grid(8, 128256, 2, dev, PlanFor::kThreeSweep).cluster == 16 && !j.prefetch && j.stage &&
            j.cluster == kMaxCluster && j.smem == kFixedSmem + static_cast<size_t>(2 * stage_bytes(j.slice, 2)),
        str("settle_plan: JSD bfloat16 128256 in 16 stages, within 8: the general plan, got ", j.cluster, " CTAs",
            j.stage ? " staged" : " streamed"));
  check(!settle_plan(plan_grid(8, 128256, 2, dev, PlanFor::kDistill), 8, 128256, 2, dev, PlanFor::kDistill, within8)
             .stage,
        "settle_plan: the forward KL's bfloat16 128256 within 8: its streaming rule");
  check(what.find("this GPU cannot run a cluster of 4 CTAs, which rows of 32000 columns need") != std::string::npos,
        "settle_plan: nothing fits: an error naming the cluster (got '" + what + "')");
  // Run: the fallbacks' results are those of the plans they fall back to.
  g_device = dev;
  Call call;
  call.grad_target = false;
  call.reduction = "none";
  const auto x = logits(5, 32000, at::kBFloat16), t = logits(5, 32000, at::kBFloat16);
  g_single_stage = true;
  const Result once = emulated(x, t, call);
  g_single_stage = false;
  g_fits = one_stage;
  check_bitwise(once, emulated(x, t, call), "settle_plan run: two stages as one = single_stage");
  g_fits = streamed;
  check_bitwise(once, emulated(x, t, call), "settle_plan run: streamed = staged once");
  const auto xf = logits(5, 60000, at::kFloat), tf = logits(5, 60000, at::kFloat);
  g_fits = within8;
  const Result replanned = emulated(xf, tf, call);
  g_fits = nullptr;
  g_device = dev8;
  check_bitwise(replanned, emulated(xf, tf, call), "settle_plan run: planned again within 8 = the plan within 8");
  g_device = kDevices[1].second;
}

// A row's per-row result and gradient rows are the same bits alone and at
// any position of any batch (and on a second run).
void test_batch_invariance() {
  for (const auto& [dev_name, dev] : kDevices) {
    g_device = dev;
    for (const int64_t cols : {100, 30000}) {
      const auto x = logits(5, cols, at::kFloat), t = logits(5, cols, at::kFloat);
      for (const double beta : {0.0, 0.5, 1.0}) {
        Call c;
        c.beta = beta;
        c.reduction = "none";
        const Result batch = emulated(x, t, c);
        check_bitwise(batch, emulated(x, t, c), str(dev_name, " second run V=", cols));
        const Result alone = emulated(x.narrow(0, 3, 1), t.narrow(0, 3, 1), c);
        const Result in_batch{std::get<0>(batch).narrow(0, 3, 1), std::get<1>(batch).narrow(0, 3, 1),
                              std::get<2>(batch).narrow(0, 3, 1), std::get<3>(batch)};
        check_bitwise(alone, in_batch, str(dev_name, " row 3 alone vs in batch V=", cols, " beta=", beta));
      }
    }
  }
}

// Finite logits of enormous magnitude, in float32 and bfloat16 (which hold
// them; float16 ends at 65504): a row is a base value b (+-1e9 to float32's
// largest) plus small multiples of b's float32 spacing, so that several
// entries carry real probability at a temperature of that spacing, beside
// entries of the opposite sign and whole rows of random logits of that size.
// The kernel's exponents and log-ratios must take differences of nearby
// logits before scaling, or the rounding of b itself (up to 64 at 1e9,
// 2e31 at 3e38) swamps them; near the largest value, a difference of two
// logits of opposite sign overflows to infinity, which must only mean a
// probability of 0, never inf - inf = NaN.
void test_huge_logits() {
  const double big[] = {1e9, -2e10, 1e30, -3.0e38, 3.38e38};
  for (const auto& [dev_name, dev] : kDevices) {
    g_device = dev;
    for (const int64_t cols : {37, 5000}) {
      for (const double b : big) {
        const double spacing = std::ldexp(1.0, std::ilogb(std::abs(b)) - 23);  // float32's at b
        auto x = at::empty({8, cols}, at::kDouble), t = at::empty({8, cols}, at::kDouble);
        for (auto* v : {&x, &t}) {
          // Rows 0-3: b + spacing * k, k in [-12, 0]; an entry of the other
          // sign in rows 1 and 3; rows 4-5: random logits of b's size.
          v->copy_(b + spacing * at::randint(-12, 1, {8, cols}, at::kDouble));
          (*v)[1][cols / 2] = -b;
          (*v)[3][cols - 1] = -std::copysign(3.38e38, b);
          v->narrow(0, 4, 2).copy_(at::randn({2, cols}, at::kDouble) * std::abs(b) / 4);
        }
        // Rows 6-7: the same offsets k / 2 spacings from b for the student
        // and from -b / 2 (whose spacing is half b's) for the teacher: a
        // log-ratio of a few spacings over T, from logits about 1.5 b apart
        // (y - x would keep none of its digits).
        const auto k = at::randint(-24, 1, {2, cols}, at::kDouble);
        x.narrow(0, 6, 2).copy_(b + spacing / 2 * k);
        t.narrow(0, 6, 2).copy_(-b / 2 + spacing / 2 * k);
        x.clamp_(-3.38e38, 3.38e38);
        t.clamp_(-3.38e38, 3.38e38);
        for (const double temperature : {0.5, 0.7, 1.0, spacing, 3 * spacing}) {
          // Near float's largest value, two logits of a row can be more than
          // that value apart: the lower one's log-probability is then -inf in
          // float arithmetic, whatever T (README, Reliability), where float64
          // gives -(distance) / T, finite at the spacing's T.
          if (std::abs(b) > 1e38 && temperature > 1) continue;
          for (const double beta : {0.0, 0.5, 1.0}) {
            for (const auto dt : {at::kFloat, at::kBFloat16}) {
              Call c;
              c.beta = beta;
              c.temperature = temperature;
              c.reduction = "none";
              // A row whose divergence is beyond the dtype's range is +inf
              // there, and has the gradients of an infinite row (README,
              // Reliability): its value is compared, its gradients are not.
              Call per_row = c;
              per_row.grad_input = per_row.grad_target = false;
              const auto exact = std::get<0>(cpu_kernel(x.to(dt).to(at::kDouble), t.to(dt).to(at::kDouble), per_row));
              const auto infinite = exact.to(dt).isinf();
              // Most rows put their mass on one entry each: their gradients
              // are the rounding of a cancellation, of order 1e-7 / T.
              const double floor = 1e-6 / temperature;
              for (const bool student_alone : {false, true}) {
                c.grad_target = !student_alone;
                compare_with_cpu(x.to(dt), t.to(dt), c,
                                 str(dev_name, " logits around b=", b, " V=", cols, " ", dt, " T=", temperature,
                                     " beta=", beta, student_alone ? " student's gradient alone" : ""),
                                 true, 1.0, floor, infinite);
              }
            }
          }
        }
      }
    }
  }
}

// Rows filled with the dtype's lowest value (torch.finfo(dtype).min, a
// common padding or masking value) beside ordinary logits: the teacher's row
// 1, the student's row 2, both in row 3. Such a row is a uniform
// distribution at any temperature. (From y - x and the rows' maxes, the
// KLs' log-ratio of row 1 was the difference of two values of about 3.4e38:
// their rounding, 2e31, at T = 1, and +inf at T = 0.5.)
void test_lowest_value_rows() {
  for (const auto& [dev_name, dev] : kDevices) {
    g_device = dev;
    for (const int64_t cols : {37, 5000, 40000}) {
      for (const auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
        // Ordinary rows of scale 1.5: at T = 0.5 those of the other tests'.
        auto x = logits(4, cols, dt, 1.5), t = logits(4, cols, dt, 1.5);
        const double low = dt == at::kFloat      ? std::numeric_limits<float>::lowest()
                           : dt == at::kBFloat16 ? static_cast<float>(std::numeric_limits<c10::BFloat16>::lowest())
                                                 : static_cast<float>(std::numeric_limits<c10::Half>::lowest());
        t[1].fill_(low);
        x[2].fill_(low);
        x[3].fill_(low);
        t[3].fill_(low);
        for (const double temperature : {0.5, 1.0, 2.0}) {
          for (const double beta : {0.0, 0.5, 1.0}) {
            for (const bool student_alone : {false, true}) {
              Call c;
              c.beta = beta;
              c.temperature = temperature;
              c.reduction = "none";
              c.grad_target = !student_alone;
              compare_with_cpu(x, t, c,
                               str(dev_name, " rows of the lowest value V=", cols, " ", dt, " T=", temperature,
                                   " beta=", beta, student_alone ? " student's gradient alone" : ""));
            }
          }
        }
      }
    }
  }
}

void test_plan() {
  const DeviceLimits h100{132, 227 * 1024, true}, a100{108, 163 * 1024, false};
  // The issue's shapes: a cluster split for long rows on Hopper, every row staged where it fits.
  // Short rows: as many lanes as give each about kPacksPerLane packs.
  const Grid s16 = plan_grid(65536, 512, 2, h100), s32 = plan_grid(65536, 512, 4, h100);
  check(s16.warp_rows && s16.lanes == 8, str("65536x512 bf16: ", s16.lanes, " lanes per row"));
  check(s32.warp_rows && s32.lanes == 16, str("65536x512 f32: ", s32.lanes, " lanes per row"));
  check(plan_grid(9, 2048, 2, h100).lanes == 32 && plan_grid(3, 1, 4, h100).lanes == 1 &&
            plan_grid(5, 37, 4, h100).lanes == 2,
        "2048 bf16: a warp; 1 f32: a lane; 37 f32: two lanes");
  // A warp per row up to 2048 columns, and 16-bit rows up to 8 KiB per
  // operand; BATCHKL_LOGITS_WARP_ROW_COLS sets the limit for every dtype.
  {
    const Grid b4096 = plan_grid(16384, 4096, 2, h100), b4097 = plan_grid(16384, 4097, 2, h100);
    check(b4096.warp_rows && b4096.lanes == 32 && b4096.smem == kFinalBytes && !b4097.warp_rows &&
              b4097.cluster == 1 && b4097.stage,
          "bf16: 4096 a warp, 4097 a staged CTA");
    check(plan_grid(16384, 4096, 2, h100, PlanFor::kDistill).warp_rows, "bf16 4096: a warp in the distillation kernel too");
    check(plan_grid(9, 2048, 4, h100).warp_rows && !plan_grid(9, 2049, 4, h100).warp_rows &&
              plan_grid(9, 2048, 8, h100).warp_rows && !plan_grid(9, 2049, 8, h100).warp_rows,
          "f32, f64: a warp up to 2048");
    DeviceLimits knob = h100;
    knob.knobs.warp_row_cols = 2048;
    check(!plan_grid(16384, 2049, 2, knob).warp_rows && plan_grid(16384, 2048, 2, knob).warp_rows,
          "BATCHKL_LOGITS_WARP_ROW_COLS=2048: the plan before 2026-11-29");
    knob.knobs.warp_row_cols = 8192;
    const Grid f8192 = plan_grid(4096, 8192, 4, knob);
    check(f8192.warp_rows && f8192.lanes == 32 && !plan_grid(4096, 8193, 2, knob).warp_rows,
          "BATCHKL_LOGITS_WARP_ROW_COLS=8192: f32 8192 on a warp, bf16 8193 not");
  }
  check(s16.blocks == std::min<int64_t>(65536 / (kThreads / 8), 132 * 8), str("65536x512 bf16: ", s16.blocks, " CTAs"));
  DeviceLimits forced = h100;
  forced.knobs.row_lanes = 32;
  check(plan_grid(65536, 512, 2, forced).lanes == 32, "BATCHKL_LOGITS_ROW_LANES=32: a warp per row");
  // Streamed rows' sweeps alternate direction, with evict-first hints;
  // BATCHKL_LOGITS_REUSE=1 drops the hints, =0 the alternation too. Short
  // rows and staged slices keep the order, evict-normal.
  {
    DeviceLimits reuse = h100;
    reuse.knobs.stage = StageMode::kNever;
    const Grid two = plan_grid(8192, 128256, 2, reuse);
    reuse.knobs.reuse = 1;
    const Grid one = plan_grid(8192, 128256, 2, reuse);
    reuse.knobs.reuse = 0;
    const Grid none = plan_grid(8192, 128256, 2, reuse);
    check(!two.stage && two.backward && two.evict_first && one.backward && !one.evict_first && !none.backward &&
              !none.evict_first,
          "BATCHKL_LOGITS_REUSE in a streamed plan");
    const Grid warp = plan_grid(65536, 512, 2, h100), staged = plan_grid(8192, 32000, 2, h100);
    check(warp.warp_rows && staged.stage && !warp.backward && !warp.evict_first && !staged.backward &&
              !staged.evict_first,
          "short rows and staged slices: sweeps in one direction, no hints");
  }
  const Grid g32 = plan_grid(8192, 32000, 2, h100);
  check(g32.cluster == 2 && g32.stage, str("8192x32000 bf16: cluster ", g32.cluster, " stage ", g32.stage));
  const Grid g128 = plan_grid(8192, 128256, 2, h100);
  check(g128.cluster == 8 && g128.stage, str("8192x128256 bf16: cluster ", g128.cluster));
  const Grid g256 = plan_grid(4096, 256000, 2, h100);
  check(g256.cluster == 8 && g256.stage, str("4096x256000 bf16: cluster ", g256.cluster, " stage ", g256.stage));
  check(!plan_grid(4096, 256000, 4, h100).stage, "4096x256000 f32 does not fit: streamed");
  // Knowing the SM's shared memory, slices that would leave one CTA per SM
  // are streamed; BATCHKL_LOGITS_STAGE=1 stages wherever a slice fits, =0 never.
  DeviceLimits sm = h100;
  sm.smem_per_sm = 228 * 1024;
  sm.smem_reserved = 1024;
  check(plan_grid(8192, 32000, 2, sm).stage && plan_grid(8192, 128256, 2, sm).stage &&
            plan_grid(8192, 32000, 4, sm).stage,
        "H100: 64 KB slices (two CTAs per SM) staged");
  check(!plan_grid(4096, 256000, 2, sm).stage && !plan_grid(8192, 128256, 4, sm).stage,
        "H100: 128 KB slices (one CTA per SM) streamed");
  check(plan_grid(4096, 256000, 2, sm).cluster == 8, "H100 256000 bf16: still 8 CTAs per row");
  // The distillation kernel streams 16-bit rows of both operands over one
  // CTA's 64 KiB slice, wider ones over 384 KiB, in slices of up to 256 KiB;
  // smaller rows are planned as for the general one; a knob set wins.
  const Grid d32 = plan_grid(8192, 32000, 2, sm, PlanFor::kDistill), d32f = plan_grid(8192, 32000, 4, sm, PlanFor::kDistill);
  check(!d32.stage && d32.cluster == 1 && d32.smem == kFixedSmem, "distillation 8192x32000 bf16: one streamed CTA");
  check(d32f.stage && d32f.cluster == 4, "distillation 8192x32000 f32: staged, as the general kernel");
  // 16000 bf16 columns (62.5 KiB) fit one CTA's staged slice; 16392 (64.03 KiB) do not.
  const Grid d16 = plan_grid(8192, 16000, 2, sm, PlanFor::kDistill), d16s = plan_grid(8192, 16392, 2, sm, PlanFor::kDistill);
  check(d16.stage && d16.cluster == 1 && !d16s.stage && d16s.cluster == 1,
        str("distillation bf16 around 64 KiB rows: ", d16.stage, " ", d16s.stage));
  check(plan_grid(8192, 16392, 2, sm).stage, "general kernel 16392 bf16: staged (the rule is the distillation kernel's)");
  const Grid d128 = plan_grid(8192, 128256, 2, sm, PlanFor::kDistill), d128f = plan_grid(8192, 128256, 4, sm, PlanFor::kDistill);
  const Grid d256 = plan_grid(4096, 256000, 2, sm, PlanFor::kDistill), d256f = plan_grid(4096, 256000, 4, sm, PlanFor::kDistill);
  check(!d128.stage && d128.cluster == 2 && !d128f.stage && d128f.cluster == 4 && !d256.stage &&
            d256.cluster == 4 && !d256f.stage && d256f.cluster == 8,
        str("distillation, long rows streamed in 256 KiB slices: ", d128.cluster, " ", d128f.cluster, " ",
            d256.cluster, " ", d256f.cluster));
  check(d128.smem == kFixedSmem && d256f.smem == kFixedSmem, "distillation, streamed: no slice in shared memory");
  check(d128.backward && d128.evict_first && d256f.backward && d32.backward && !d32f.backward && !d32f.evict_first,
        "distillation: streamed rows alternate, evict-first; staged ones do not");
  check(plan_grid(4096, 256000, 2, sm).backward, "H100 256000 bf16, streamed (slices too large to stage): alternate");
  check(plan_grid(8192, 128256, 2, a100, PlanFor::kDistill).cluster == 1, "distillation without clusters: one CTA per row");
  // 16-bit rows of 300 KiB: streamed in two slices; float32 rows of 300 KiB
  // (not measured streamed): the general kernel's plan.
  const Grid d76 = plan_grid(8192, 76800, 2, sm, PlanFor::kDistill);
  check(!d76.stage && d76.cluster == 2, str("distillation, bf16 rows of 300 KiB: ", d76.cluster, " streamed CTAs"));
  const Grid f38 = plan_grid(8192, 38400, 4, sm, PlanFor::kDistill), g38 = plan_grid(8192, 38400, 4, sm);
  check(f38.stage == g38.stage && f38.cluster == g38.cluster && f38.slice == g38.slice && f38.stage,
        str("distillation, float32 rows of 300 KiB: planned as the general kernel's, ", f38.cluster, " ", g38.cluster));
  DeviceLimits sliced = sm;
  sliced.knobs.slice_budget = 32 * 1024;
  check(plan_grid(8192, 128256, 2, sliced, PlanFor::kDistill).cluster == 8 && plan_grid(8192, 128256, 2, sliced, PlanFor::kDistill).stage,
        "distillation: BATCHKL_LOGITS_SLICE_KIB wins");
  // Any staging knob, or BATCHKL_LOGITS_DISTILL_STREAM=0, turns the rule off.
  for (const auto mode : {StageMode::kNever, StageMode::kWhereFits}) {
    DeviceLimits staged_knob = sm;
    staged_knob.knobs.stage = mode;
    check(plan_grid(8192, 128256, 2, staged_knob, PlanFor::kDistill).cluster == plan_grid(8192, 128256, 2, staged_knob).cluster,
          "distillation: BATCHKL_LOGITS_STAGE wins");
  }
  DeviceLimits no_stream = sm;
  no_stream.knobs.distill_stream = false;
  const Grid off = plan_grid(8192, 128256, 2, no_stream, PlanFor::kDistill), general = plan_grid(8192, 128256, 2, no_stream);
  check(off.cluster == general.cluster && off.stage == general.stage && off.cluster == 8,
        str("BATCHKL_LOGITS_DISTILL_STREAM=0: the general plan, ", off.cluster));
  DeviceLimits all = sm, none = sm;
  all.knobs.stage = StageMode::kWhereFits;
  none.knobs.stage = StageMode::kNever;
  check(plan_grid(4096, 256000, 2, all).stage && !plan_grid(8192, 32000, 2, none).stage, "stage knob");
  DeviceLimits a100sm = a100;
  a100sm.smem_per_sm = 164 * 1024;
  check(plan_grid(8192, 32000, 2, a100sm).stage, "A100 (no clusters): staged wherever it fits (the streaming rule is measured on Hopper only)");
  const Grid a = plan_grid(8192, 32000, 2, a100);
  check(a.cluster == 1 && a.stage, "A100 8192x32000 bf16: one CTA, staged");
  // The slices cover the row and none is empty (rows past a warp's).
  for (const int64_t cols : {2049, 4097, 5000, 40000, 40003, 128256, 256000, 1000003}) {
    for (const int64_t elem : {2, 4, 8}) {
      if (cols <= warp_row_cols(elem, h100.knobs)) continue;
      const Grid g = plan_grid(1, cols, elem, h100);
      check(!g.warp_rows && g.slice * g.cluster >= cols && g.slice * (g.cluster - 1) < cols && g.slice % (16 / elem) == 0,
            str("slices of ", cols, " x ", elem, " bytes: ", g.cluster, " x ", g.slice));
    }
  }
}

// Short rows at every lane count (BATCHKL_LOGITS_ROW_LANES): several rows per
// warp, each group reducing over its own lanes, while a neighbouring group's
// row is masked out (returns early, reaches no shuffle) or NaN; each row
// against the CPU kernel, and bitwise alone vs in its batch.
void test_row_lanes() {
  for (const int lanes : {1, 2, 4, 8, 16, 32}) {
    g_device = kDevices[1].second;
    g_device.knobs.row_lanes = lanes;
    for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{37, 13}, {19, 512}, {9, 2048}}) {
      for (const auto dt : {at::kFloat, at::kBFloat16}) {
        auto x = logits(rows, cols, dt), t = logits(rows, cols, dt);
        x[2][cols / 2] = std::numeric_limits<double>::quiet_NaN();
        auto mask = at::rand({rows}) < 0.7;
        mask[1] = false;
        mask[3] = true;
        for (const double beta : {0.0, 0.5}) {
          Call c;
          c.beta = beta;
          c.reduction = "none";
          const std::string what = str("lanes=", lanes, " ", rows, "x", cols, " ", dt, " beta=", beta);
          // One or two lanes add up to 2048 floats each in sequence (the
          // default plan gives such rows a warp): the JSD gradient's row
          // totals then carry up to about 2048 ulp (1.2e-4) of rounding.
          // (bfloat16's tolerance covers that already.)
          const double loosen = lanes <= 2 && cols >= 2048 && dt == at::kFloat ? 8.0 : 1.0;
          compare_with_cpu(x, t, c, what, true, loosen);
          Call m = c;
          m.mask = mask;
          m.reduction = "batchmean";
          compare_with_cpu(x, t, m, what + " masked", true, loosen);
          const Result batch = emulated(x, t, c);
          const Result alone = emulated(x.narrow(0, 3, 1), t.narrow(0, 3, 1), c);
          check_bitwise(alone, {std::get<0>(batch).narrow(0, 3, 1), std::get<1>(batch).narrow(0, 3, 1),
                                std::get<2>(batch).narrow(0, 3, 1), std::get<3>(batch)},
                        what + ": row 3 alone vs in batch");
        }
      }
    }
  }
  // More rows than one pass of the grid holds (one SM: 8 CTAs of 256 / lanes
  // rows each), so that every group takes further rows in the grid-stride
  // loop: each row against the CPU kernel.
  for (const int lanes : {1, 4, 32}) {
    g_device = DeviceLimits{1, 227 * 1024, true};
    g_device.knobs.row_lanes = lanes;
    const int64_t rows = 8 * (kThreads / lanes) * 2 + 5;
    for (const auto dt : {at::kFloat, at::kBFloat16}) {
      const auto x = logits(rows, 13, dt), t = logits(rows, 13, dt);
      Call c;
      c.reduction = "none";
      compare_with_cpu(x, t, c, str("lanes=", lanes, " ", rows, "x13 ", dt, ": rows past the grid's first pass"));
      Call m = c;
      m.beta = 0.5;
      m.mask = at::rand({rows}) < 0.5;
      m.reduction = "batchmean";
      compare_with_cpu(x, t, m, str("lanes=", lanes, " ", rows, "x13 ", dt, " masked JSD: rows past the first pass"));
    }
  }
  g_device = kDevices[1].second;
}

// Random calls against the CPU kernel: shape, dtype, layout, divergence,
// temperature, reduction, mask, num_items_in_batch, gradients, special
// values and every launch knob drawn at once (the tests above vary one or
// two at a time). `count` calls from `seed`; a failure names the seed and
// the call's index K, which `random SEED K+1 K` replays alone.
void test_random(int count, uint64_t seed, int only = -1) {
  std::mt19937_64 rng(seed);
  const auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  const auto uniform = [&](double lo, double hi) { return lo + (hi - lo) * static_cast<double>(rng() >> 11) * 0x1.0p-53; };
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  for (int k = 0; k < count; ++k) {
    at::manual_seed(seed * 7919 + static_cast<uint64_t>(k));
    DeviceLimits dev = kDevices[pick(3)].second;
    const int lanes[] = {0, 0, 0, 1, 2, 4, 8, 16, 32};
    dev.knobs.row_lanes = lanes[pick(9)];
    const StageMode stages[] = {StageMode::kAuto, StageMode::kAuto, StageMode::kNever, StageMode::kWhereFits};
    dev.knobs.stage = stages[pick(4)];
    const int64_t budgets[] = {kSliceBudget, kSliceBudget, 8 * 1024, 32 * 1024, 128 * 1024};
    dev.knobs.slice_budget = budgets[pick(5)];
    dev.knobs.lean = pick(4);
    dev.knobs.share = pick(4) != 0;
    dev.knobs.merge = pick(2) == 0;
    dev.knobs.distill_stream = pick(4) != 0;
    dev.knobs.reuse = pick(3);
    dev.knobs.prefetch = pick(3) == 0;
    dev.knobs.keep = k % 3;  // from the index, not the stream: the other draws stay those of before the knob
    dev.max_cluster_ahead = pick(2) == 0 ? kMaxCluster : kMaxClusterAhead;
    const int64_t warp_cols[] = {0, 0, 0, 2048, 8192};  // BATCHKL_LOGITS_WARP_ROW_COLS
    dev.knobs.warp_row_cols = warp_cols[pick(5)];
    g_device = dev;
    g_resident = 1 + pick(3);

    const auto dt = dtypes[pick(4)];
    const int size_class = pick(10);
    const int64_t cols = size_class < 5 ? 1 + pick(80) : size_class < 9 ? 80 + pick(6000) : 6000 + pick(50000);
    const int64_t max_rows = std::max<int64_t>(1, std::min<int64_t>(24, 160000 / cols));
    const int64_t rows = 1 + pick(static_cast<int>(max_rows));
    Call c;
    const int beta_kind = pick(4);
    c.beta = beta_kind == 0 ? 0.0 : beta_kind == 1 ? 1.0 : beta_kind == 2 ? 0.5 : uniform(0.0, 1.0);
    const int t_kind = pick(4);
    c.temperature = t_kind == 0 ? 1.0 : t_kind == 1 ? 2.0 : t_kind == 2 ? 0.5 : uniform(0.3, 4.0);
    const char* reductions[] = {"none", "batchmean", "sum", "mean"};
    c.reduction = reductions[pick(4)];
    c.probs = pick(6) == 0;
    if (c.probs) c.temperature = 1.0;  // probabilities take no temperature
    const int grads = pick(4);  // both, the student's alone, the teacher's alone, none
    c.grad_input = grads <= 1;
    c.grad_target = grads == 0 || grads == 2;
    if (pick(3) == 0) {
      auto mask = at::rand({rows}, at::kDouble) < 0.6;
      if (pick(4) == 0) mask.fill_(pick(2) == 0);
      c.mask = mask;
    }
    if (pick(4) == 0) c.num_items = at::tensor(static_cast<double>(1 + pick(40)), at::kDouble).to(pick(2) ? at::kFloat : at::kLong);

    const double scale = std::array<double, 3>{1.0, 3.0, 8.0}[pick(3)];
    at::Tensor x, t;
    if (c.probs) {
      x = at::rand({rows, cols}, at::kDouble);
      t = at::rand({rows, cols}, at::kDouble);
    } else {
      x = at::randn({rows, cols}, at::kDouble) * scale;
      t = at::randn({rows, cols}, at::kDouble) * scale;
    }
    // Special values: zeros (probs), -inf on either side or both, NaN, +inf.
    bool special = false;
    const auto sprinkle = [&](at::Tensor& v, double frac, double value) {
      v.masked_fill_(at::rand(v.sizes(), at::kDouble) < frac, value);
      special = true;
    };
    const int sp = pick(8);
    if (c.probs) {
      if (sp < 3) sprinkle(pick(2) ? x : t, 0.2, 0.0);
    } else if (sp == 0) {
      sprinkle(x, 0.2, -inf);
    } else if (sp == 1) {
      sprinkle(t, 0.2, -inf);
    } else if (sp == 2) {
      const auto vocab = at::rand({cols}, at::kDouble) < 0.3;
      x.masked_fill_(vocab, -inf);
      t.masked_fill_(vocab, -inf);
      special = true;
    } else if (sp == 3) {
      x[pick(static_cast<int>(rows))][pick(static_cast<int>(cols))] = pick(2) ? nan : inf;
      special = true;
    }
    const std::string kinds[] = {"contiguous", "contiguous", "misaligned", "strided", "lead"};
    const std::string kind = kinds[pick(5)];
    // 'batchmean' divides by the first dim: 2 for "lead", which is compared
    // with the same rows in two dims.
    if (kind == "lead" && c.reduction == "batchmean") c.reduction = "sum";
    const auto xd = layout(x.to(dt), kind), td = layout(t.to(dt), kind);
    if (only >= 0 && k != only) continue;
    const std::string what = str("random seed ", seed, " #", k, ": ", dt, " ", rows, "x", cols, " ", kind, " beta=",
                                 c.beta, " T=", c.temperature, " ", c.reduction, c.probs ? " probs" : "",
                                 c.mask ? " mask" : "", c.num_items ? " num_items" : "", " grads=", c.grad_input,
                                 c.grad_target, special ? " special" : "", " lanes=", dev.knobs.row_lanes,
                                 " stage=", static_cast<int>(dev.knobs.stage), " budget=", dev.knobs.slice_budget,
                                 " lean=", dev.knobs.lean, " share=", dev.knobs.share, " merge=", dev.knobs.merge,
                                 " distill_stream=", dev.knobs.distill_stream, " reuse=", dev.knobs.reuse,
                                 " prefetch=", dev.knobs.prefetch, " keep=", dev.knobs.keep,
                                 " ahead=", dev.max_cluster_ahead,
                                 " warp_row_cols=", dev.knobs.warp_row_cols,
                                 " resident=", g_resident);
    if (kind == "lead" && rows % 2 == 0) {
      // (2, rows / 2, V): the same rows, outputs of that shape.
      Call cl = c;
      if (c.mask) cl.mask = c.mask->reshape({2, rows / 2});
      const auto run = emulated_or_fail(xd, td, cl, what);
      if (!run) continue;
      const Result& e = *run;
      const Result r = emulated(x.to(dt), t.to(dt), c);
      const auto as_rows = [&](const at::Tensor& g) { return g.numel() ? g.reshape({rows, cols}) : g; };
      check_results_close({std::get<0>(e).reshape(std::get<0>(r).sizes()), as_rows(std::get<1>(e)),
                           as_rows(std::get<2>(e)), std::get<3>(e)},
                          r, dt, c.grad_target, what + " (lead vs contiguous)");
      continue;
    }
    // A gradient's natural size: 1 / T over the divisor, the terms' size
    // times the derivative of the logits' scaling.
    double divisor = 1.0;
    if (c.num_items) {
      divisor = c.num_items->to(at::kDouble).item<double>();
    } else if (c.reduction == "batchmean" || c.reduction == "mean") {
      const double kept = c.mask ? static_cast<double>(c.mask->sum().item<int64_t>()) : static_cast<double>(rows);
      divisor = std::max(kept, 1.0) * (c.reduction == "mean" ? static_cast<double>(cols) : 1.0);
    }
    const double floor = (dt == at::kDouble ? 1e-13 : 1e-6) / (c.temperature * divisor);
    // A kept row whose divergence is +inf (a probability of 0 on the side
    // the divergence divides by) has no defined gradient: -inf where the
    // other probability is positive, 0 * -inf where it underflows, which it
    // does at a different place on the GPU (flushing subnormals) than on
    // the CPU. Its value is compared; its gradient rows are not.
    // Without special values every probability is positive in float64 (the
    // reference there): no row is infinite.
    std::optional<at::Tensor> infinite;
    if (special) {
      Call per_row = c;
      per_row.reduction = "none";
      per_row.mask = std::nullopt;
      per_row.num_items = std::nullopt;
      per_row.grad_input = per_row.grad_target = false;
      infinite = std::get<0>(cpu_kernel(x.to(dt), t.to(dt), per_row)).isinf();
      if (c.mask) infinite = *infinite & *c.mask;
    }
    // Special values are compared in the inputs' dtype, where the CPU
    // kernel's rounding adds to the emulated one's: twice the tolerances.
    compare_with_cpu(xd, td, c, what, !special, special ? 2.0 : 1.0, floor, infinite);
  }
  g_device = kDevices[1].second;
  g_resident = 2;
}

}  // namespace

// `part`, one of:
//   checks      the plan, layouts, probabilities
//   knobs       the other launch knobs' own tests
//   prefetch    BATCHKL_LOGITS_PREFETCH's own test: the forward KL, the plans, the fallbacks
//   prefetch3   the same for JSD and reverse KL (BATCHKL_LOGITS_LEAN=3)
//   magnitudes  logits from 1e9 to float's largest value, rows of the lowest value
//   default     every launch shape as planned by default
//   other       the same with a row's maxes and sums merged in one exchange, every
//               sweep forward and the distillation kernel's rows double-buffered on
//               a grid of two clusters
//   random SEED COUNT [ONLY]   test_random; not part of "all"
// No argument: all but random. ctest runs the parts side by side.
int main(int argc, char** argv) {
  const std::string part = argc > 1 ? argv[1] : "all";
  if (part != "all" && part != "checks" && part != "knobs" && part != "default" && part != "other" &&
      part != "prefetch" && part != "prefetch3" && part != "magnitudes" && part != "random") {
    std::fprintf(stderr,
                 "test_logits_emulated: expected no argument or one of checks, knobs, default, other, prefetch, prefetch3, "
                 "magnitudes, random [SEED [COUNT [ONLY]]]; got '%s'\n",
                 part.c_str());
    return 2;
  }
  at::manual_seed(0);
  if (part == "random") {
    const uint64_t seed = argc > 2 ? std::stoull(argv[2]) : 1;
    const int count = argc > 3 ? std::stoi(argv[3]) : 300;
    test_random(count, seed, argc > 4 ? std::stoi(argv[4]) : -1);
    std::printf("%s: %d checks, %d failed\n", part.c_str(), g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
  }
  if (part == "all" || part == "checks") {
    test_plan();
    test_layouts_reductions_masks();
    test_layouts_bitwise();
    test_probs_mode();
  }
  if (part == "all" || part == "knobs") {
    test_lean_and_share_knobs();
    test_keep_knob();
    test_three_sweep_distill_kernels();
    test_merged_exchange();
    test_sweep_directions();
  }
  if (part == "all" || part == "prefetch") {
    test_prefetch({0.0});
    test_prefetch_plans();
    test_settle_plan();
  }
  if (part == "all" || part == "prefetch3") test_prefetch({0.5, 1.0});
  if (part == "all" || part == "magnitudes") {
    test_huge_logits();
    test_lowest_value_rows();
  }
  // Every launch shape against the CPU kernel, special values, determinism
  // and batch invariance: as planned by default, then with a row's maxes and
  // sums merged in one exchange, every sweep forward and the distillation
  // kernel's rows double-buffered.
  for (const bool other : {false, true}) {
    if (part != "all" && part != (other ? "other" : "default")) continue;
    g_merge = g_forward = g_prefetch = other;
    test_shapes_dtypes_divergences();
    test_special_values();
    test_staged_equals_streamed();
    test_batch_invariance();
    test_row_lanes();
  }
  g_merge = g_forward = g_prefetch = false;
  std::printf("%s: %d checks, %d failed\n", part.c_str(), g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
