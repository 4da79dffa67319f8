// C++ (libtorch) test of `batchkl::kl`, run by ctest. Calls the op through the
// dispatcher only, as a libtorch user would after linking libbatchkl.so, and
// checks against references computed with ATen ops in double:
//   (a) values for every reduction, log_target false/true, a few layouts and dtypes;
//   (b) autograd from C++ (the autograd Function registered at the Autograd key);
//   (c) the zero-probability rule (target 0 -> loss 0 and gradients 0, not NaN);
//   (d) a bad reduction string throws c10::ValueError;
//   (e) CUDA vs CPU, when CUDA is available and the CUDA kernels were built;
//   (f) `batchkl::kl_with_logits`: forward KL, reverse KL and JSD against ATen's
//       log_softmax formula, its gradients from C++, a mask, and a bad temperature.
// Prints every failed check and returns non-zero if there was one.
//
// Env: BATCHKL_REQUIRE_CUDA=1 makes a skipped CUDA part a failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <batchkl/batchkl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "check.h"

namespace {

using batchkl_test::check;
using batchkl_test::g_checks;
using batchkl_test::g_failures;

using c10::str;

// The public C++ API (csrc/include/batchkl/batchkl.h), as a libtorch program calls it.
using batchkl::kl;
using batchkl::kl_with_logits;

const std::vector<std::string> kReductions = {"none", "sum", "mean", "batchmean", "row"};

// F.kl_div's reductions (plus 'row') of an elementwise tensor.
at::Tensor reduce(const at::Tensor& elem, const std::string& reduction, const at::Tensor& input) {
  if (reduction == "none") return elem;
  if (reduction == "sum") return elem.sum();
  if (reduction == "mean") return elem.sum() / static_cast<double>(elem.numel());
  if (reduction == "batchmean") return elem.sum() / static_cast<double>(input.dim() > 0 ? input.size(0) : 1);
  if (reduction == "row") return elem.sum(-1);
  throw std::runtime_error("unknown reduction " + reduction);
}

// The loss in double: (t * (t.log() - x)) reduced, with the zero-probability
// rule (0 where p == 0). With `magnitude`, instead the same reduction of
// |p| * (|log p| + |x|): the scale of the rounding error of the terms.
at::Tensor reference(const at::Tensor& input, const at::Tensor& target, const std::string& reduction,
                     bool log_target, bool magnitude = false) {
  const auto x = input.detach().to(at::kDouble).cpu();
  const auto t = target.detach().to(at::kDouble).cpu();
  const auto p = log_target ? t.exp() : t;
  const auto log_p = log_target ? t : t.log();
  auto elem = magnitude ? p.abs() * (log_p.abs() + x.abs()) : p * (log_p - x);
  elem = at::where(p == 0, at::zeros_like(elem), elem);
  return reduce(elem, reduction, input);
}

// |actual - expected| <= rtol * (|expected| + scale) elementwise (NaNs must
// match), where `scale` is the magnitude of the summed terms: cancellation in
// p * (log p - x) makes a purely relative bound meaningless near 0.
bool close(const at::Tensor& actual, const at::Tensor& expected, double rtol, const at::Tensor& scale,
           std::string* why) {
  if (actual.sizes() != expected.sizes()) {
    *why = str("shape ", actual.sizes(), " != expected ", expected.sizes());
    return false;
  }
  const auto a = actual.detach().to(at::kDouble).cpu();
  const auto b = expected.detach().to(at::kDouble).cpu();
  const auto both_nan = a.isnan() & b.isnan();
  const auto same_inf = (a == b) & a.isinf();
  const auto ok = ((a - b).abs() <= rtol * (b.abs() + scale.to(at::kDouble).cpu())) | both_nan | same_inf;
  if (!ok.all().item<bool>()) {
    const auto diff = at::where(ok, at::zeros_like(a), (a - b).abs().nan_to_num(std::numeric_limits<double>::infinity()));
    const auto worst = diff.argmax().item<int64_t>();
    *why = str("max abs diff ", diff.max().item<double>(), " at flat index ", worst, ": got ",
               a.reshape(-1)[worst].item<double>(), ", expected ", b.reshape(-1)[worst].item<double>(), " (rtol ",
               rtol, ", ", (~ok).sum().item<int64_t>(), " of ", ok.numel(), " elements off)");
    return false;
  }
  return true;
}

void check_close(const at::Tensor& actual, const at::Tensor& expected, double rtol, double atol,
                 const std::string& what) {
  std::string why;
  check(close(actual, expected, rtol, at::full({}, atol / rtol, at::kDouble), &why), what + ": " + why);
}

// The op against the reference, with the error scale of these inputs.
void check_op(const at::Tensor& actual, const at::Tensor& input, const at::Tensor& target, const std::string& red,
              bool log_target, double rtol, const std::string& what) {
  std::string why;
  check(close(actual, reference(input, target, red, log_target), rtol,
              reference(input, target, red, log_target, /*magnitude=*/true), &why),
        what + ": " + why);
}

double rtol_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 5e-3;
    default: return 3e-2;  // bfloat16
  }
}

// A batch of distributions along the last dim: log-probabilities for the
// input, probabilities (or log-probabilities) for the target.
struct Case {
  at::Tensor input, target;
};

Case make_case(at::IntArrayRef input_shape, at::IntArrayRef target_shape, bool log_target, at::ScalarType dtype,
               const at::Device& device = at::kCPU) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::log_softmax(at::randn(input_shape, opts), -1);
  auto t = log_target ? at::log_softmax(at::randn(target_shape, opts), -1) : at::softmax(at::randn(target_shape, opts), -1);
  return {x.to(device, dtype), t.to(device, dtype)};
}

// (a) Values against the double reference.
void test_values() {
  struct Shapes {
    std::vector<int64_t> input, target;
  };
  const std::vector<Shapes> shapes = {
      {{4, 10}, {4, 10}},
      {{3, 5, 7}, {3, 5, 7}},
      {{2, 20000}, {2, 20000}},  // rows longer than one tile
      {{1, 37}, {1, 37}},        // not a multiple of the vector width
      {{4, 10}, {10}},           // broadcast target
      {{6}, {6}},                // 1-d
  };
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (const bool log_target : {false, true}) {
      for (const auto& s : shapes) {
        const auto c = make_case(s.input, s.target, log_target, dtype);
        for (const auto& red : kReductions) {
          const auto what = str("values: dtype ", dtype, " log_target ", log_target, " input ", at::IntArrayRef(s.input),
                                " target ", at::IntArrayRef(s.target), " reduction '", red, "'");
          try {
            const auto out = kl(c.input, c.target, red, log_target);
            check(out.scalar_type() == dtype, what + ": dtype " + std::string(c10::toString(out.scalar_type())));
            // Reference from the same (rounded) inputs, so only the op's own
            // rounding is measured.
            check_op(out, c.input, c.target, red, log_target, rtol_for(dtype), what);
          } catch (const std::exception& e) {
            check(false, what + ": threw " + e.what());
          }
        }
      }
    }
  }
  // Non-contiguous operands (a transposed input, a sliced target).
  for (const bool log_target : {false, true}) {
    const auto c = make_case({12, 9}, {9, 24}, log_target, at::kFloat);
    const auto x = c.input.t();                                  // (9, 12), strided
    const auto t = c.target.slice(/*dim=*/1, 0, 24, 2);          // (9, 12), stride 2
    for (const auto& red : kReductions) {
      const auto what = str("values: non-contiguous, log_target ", log_target, " reduction '", red, "'");
      try {
        check_op(kl(x, t, red, log_target), x, t, red, log_target, 2e-5, what);
      } catch (const std::exception& e) {
        check(false, what + ": threw " + e.what());
      }
    }
  }
  // Defaults of the schema: reduction="mean", log_target=False.
  {
    const auto c = make_case({4, 10}, {4, 10}, false, at::kDouble);
    const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow("batchkl::kl", "").schema();
    check(schema.arguments().size() == 4 && schema.arguments()[2].default_value().has_value() &&
              schema.arguments()[2].default_value()->toStringRef() == "mean",
          "schema: reduction defaults to 'mean'");
  }
}

// (b) Gradients from C++ autograd.
// `loss(x, t)`'s gradient w.r.t. x, taken with create_graph, then the
// gradient of |dL/dx|^2 + <x, t> w.r.t. t: must throw batchkl's error.
template <class Loss>
void check_double_backward_raises(Loss loss, const Case& c, const std::string& what) {
  auto x = c.input.clone().requires_grad_(), t = c.target.clone().requires_grad_();
  try {
    const auto gx = torch::autograd::grad({loss(x, t).sum()}, {x}, {}, std::nullopt, /*create_graph=*/true)[0];
    torch::autograd::grad({gx.pow(2).sum() + (x * t).sum()}, {t});
    check(false, what + ": no exception");
  } catch (const std::exception& e) {
    check(std::string(e.what()).find("second derivatives") != std::string::npos,
          what + ": not batchkl's error: " + e.what());
  }
}

void test_autograd() {
  const int64_t B = 8, C = 33;
  for (const bool log_target : {false, true}) {
    for (const auto& red : kReductions) {
      const auto what = str("autograd: log_target ", log_target, " reduction '", red, "'");
      try {
        const auto c = make_case({B, C}, {B, C}, log_target, at::kDouble);
        auto x = c.input.clone().requires_grad_(true);
        auto t = c.target.clone().requires_grad_(true);
        auto loss = kl(x, t, red, log_target);
        check(loss.requires_grad(), what + ": loss does not require grad");
        // grad_output: ones for scalars, a random weight per element / row otherwise.
        at::Tensor w;
        if (red == "none" || red == "row") {
          w = at::rand(loss.sizes(), at::kDouble) + 0.5;
          loss.backward(w);
        } else {
          loss.backward();
        }
        const auto xd = c.input, td = c.target;
        const auto p = log_target ? td.exp() : td;
        const auto log_p = log_target ? td : td.log();
        at::Tensor scale;
        if (red == "none") scale = w;
        else if (red == "row") scale = w.unsqueeze(-1);
        else if (red == "sum") scale = at::ones({}, xd.options());
        else if (red == "mean") scale = at::full({}, 1.0 / (B * C), xd.options());
        else scale = at::full({}, 1.0 / B, xd.options());  // batchmean
        const auto gx = -p * scale;
        const auto gt = (log_target ? p * (log_p - xd + 1) : log_p + 1 - xd) * scale;
        check(x.grad().defined() && t.grad().defined(), what + ": gradient not defined");
        if (x.grad().defined()) check_close(x.grad(), gx, 1e-10, 1e-13, what + ", d/d input");
        if (t.grad().defined()) check_close(t.grad(), gt, 1e-10, 1e-13, what + ", d/d target");
      } catch (const std::exception& e) {
        check(false, what + ": threw " + e.what());
      }
    }
  }
  // The brief's canonical case, float32: batchmean -> x.grad == -t / N.
  {
    const auto c = make_case({16, 100}, {16, 100}, false, at::kFloat);
    auto x = c.input.clone().requires_grad_();
    auto loss = kl(x, c.target, "batchmean", false);
    loss.backward();
    check(x.grad().defined(), "autograd: float32 batchmean: x.grad() undefined");
    if (x.grad().defined()) {
      check_close(x.grad(), -c.target / 16.0, 1e-6, 1e-9, "autograd: float32 batchmean x.grad == -t / N");
    }
  }
  // Broadcast target with requires_grad: its gradient is summed back to its shape.
  {
    const auto c = make_case({5, 12}, {12}, false, at::kDouble);
    auto x = c.input.clone().requires_grad_();
    auto t = c.target.clone().requires_grad_();
    kl(x, t, "sum", false).backward();
    const auto tb = c.target.expand({5, 12});
    check_close(x.grad(), -tb, 1e-12, 1e-14, "autograd: broadcast target, d/d input");
    check_close(t.grad(), (c.target.log() + 1 - c.input).sum(0), 1e-10, 1e-12,
                "autograd: broadcast target, d/d target summed to its shape");
  }
  // Only the target requires grad.
  {
    const auto c = make_case({4, 7}, {4, 7}, false, at::kDouble);
    auto t = c.target.clone().requires_grad_();
    kl(c.input, t, "mean", false).backward();
    check_close(t.grad(), (c.target.log() + 1 - c.input) / 28.0, 1e-10, 1e-13, "autograd: only target requires grad");
  }
  // Second derivatives: a clear error wherever a second differentiation goes
  // through the fused gradient, even where other terms give it something to
  // differentiate (a gradient penalty |dL/dx|^2 + <x, t>, w.r.t. t).
  for (const auto& red : kReductions) {
    check_double_backward_raises(
        [&](const at::Tensor& x, const at::Tensor& t) { return kl(x, t, red, false); },
        make_case({4, 7}, {4, 7}, false, at::kDouble), str("autograd: double backward, reduction '", red, "'"));
  }
}

// (c) Zero-probability rule: where p == 0 the loss and gradients are 0, even
// with input -inf (PyTorch's formula gives NaN there).
void test_zero_probability() {
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const bool log_target : {false, true}) {
      // Row 0: a zero-probability entry with input -inf; row 1: one with a finite input.
      auto p = at::tensor({0.0, 0.5, 0.5, 0.25, 0.0, 0.75}, at::kDouble).reshape({2, 3});
      auto x = at::tensor({-inf, std::log(0.4), std::log(0.6), std::log(0.3), -2.0, std::log(0.7)}, at::kDouble)
                   .reshape({2, 3});
      auto t = log_target ? p.log() : p;  // log(0) = -inf
      const auto xi = x.to(dtype), ti = t.to(dtype);
      for (const auto& red : kReductions) {
        const auto what = str("zero probability: dtype ", dtype, " log_target ", log_target, " reduction '", red, "'");
        try {
          const auto out = kl(xi, ti, red, log_target);
          check(!out.isnan().any().item<bool>(), what + ": NaN in the loss");
          check_op(out, xi, ti, red, log_target, rtol_for(dtype), what);
          if (red == "none") {
            check(out[0][0].item<double>() == 0.0 && out[1][1].item<double>() == 0.0,
                  what + ": loss at p == 0 is not 0");
          }
          // Gradients: 0 where p == 0, never NaN.
          auto xg = xi.clone().requires_grad_();
          auto tg = ti.clone().requires_grad_();
          auto loss = kl(xg, tg, red, log_target);
          loss.backward(at::ones_like(loss));
          check(!xg.grad().isnan().any().item<bool>() && !tg.grad().isnan().any().item<bool>(),
                what + ": NaN in a gradient");
          for (const auto& idx : std::vector<std::pair<int, int>>{{0, 0}, {1, 1}}) {
            check(xg.grad()[idx.first][idx.second].item<double>() == 0.0 &&
                      tg.grad()[idx.first][idx.second].item<double>() == 0.0,
                  what + str(": gradient at p == 0 (", idx.first, ",", idx.second, ") is not 0"));
          }
        } catch (const std::exception& e) {
          check(false, what + ": threw " + e.what());
        }
      }
    }
  }
  // A NaN target is not a zero probability: it propagates.
  {
    auto t = at::tensor({0.5, std::nan(""), 0.5}, at::kDouble);
    auto x = at::tensor({-1.0, -1.0, -1.0}, at::kDouble);
    check(kl(x, t, "sum", false).isnan().item<bool>(), "zero probability: a NaN target must give a NaN sum");
  }
}

// (d) Argument errors.
void test_errors() {
  const auto c = make_case({4, 10}, {4, 10}, false, at::kFloat);
  for (const bool requires_grad : {false, true}) {
    const auto what = str("errors: bad reduction (input requires_grad ", requires_grad, ")");
    const auto x = requires_grad ? c.input.clone().requires_grad_() : c.input;
    try {
      kl(x, c.target, "average", false);
      check(false, what + ": no exception");
    } catch (const c10::ValueError& e) {
      check(std::string(e.what()).find("reduction") != std::string::npos,
            what + ": message does not mention 'reduction': " + e.what());
    } catch (const c10::Error& e) {
      check(false, what + ": threw c10::Error but not c10::ValueError: " + e.what());
    } catch (const std::exception& e) {
      check(false, what + ": threw a non-c10 exception: " + e.what());
    }
  }
  try {
    kl(c.input.to(at::kLong), c.target, "sum", false);
    check(false, "errors: integer input: no exception");
  } catch (const c10::Error&) {
  }
}

// (e) CUDA vs CPU.
bool test_cuda() {
  const auto& op = c10::Dispatcher::singleton().findSchemaOrThrow("batchkl::kl", "");
#ifndef BATCHKL_WITH_CUDA
  // A CPU-only build links libtorch_cpu alone, so torch's CUDA is not even loaded.
  std::printf("libbatchkl was built without CUDA kernels (BATCHKL_WITH_CUDA=OFF): skipping the CUDA-vs-CPU checks\n");
  return false;
#endif
  if (!torch::cuda::is_available()) {
    std::printf("CUDA not available at runtime: skipping the CUDA-vs-CPU checks\n");
    return false;
  }
  if (!op.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    check(false, "cuda: built with BATCHKL_WITH_CUDA but no CUDA kernel is registered for batchkl::kl");
    return false;
  }
  const at::Device dev(at::kCUDA, 0);
  const std::vector<std::vector<int64_t>> shapes = {{4, 10}, {3, 5, 7}, {2, 20000}, {64, 1000}, {1, 37}};
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (const bool log_target : {false, true}) {
      for (const auto& s : shapes) {
        const auto c = make_case(s, s, log_target, dtype);
        const auto xc = c.input.to(dev), tc = c.target.to(dev);
        for (const auto& red : kReductions) {
          const auto what = str("cuda vs cpu: dtype ", dtype, " log_target ", log_target, " shape ",
                                at::IntArrayRef(s), " reduction '", red, "'");
          try {
            const auto out = kl(xc, tc, red, log_target);
            check(out.device() == xc.device(), what + ": output not on the input's device");
            std::string why;
            check(close(out.cpu(), kl(c.input, c.target, red, log_target), rtol_for(dtype),
                        reference(c.input, c.target, red, log_target, /*magnitude=*/true), &why),
                  what + ": " + why);
            check_op(out, c.input, c.target, red, log_target, rtol_for(dtype), what + " (vs reference)");
          } catch (const std::exception& e) {
            check(false, what + ": threw " + e.what());
          }
        }
      }
    }
  }
  // Gradients on CUDA.
  for (const bool log_target : {false, true}) {
    for (const auto& red : kReductions) {
      const auto what = str("cuda autograd: log_target ", log_target, " reduction '", red, "'");
      try {
        const auto c = make_case({8, 300}, {8, 300}, log_target, at::kDouble);
        at::Tensor grads[2][2];
        for (int d = 0; d < 2; ++d) {
          auto x = (d ? c.input.to(dev) : c.input).clone().requires_grad_();
          auto t = (d ? c.target.to(dev) : c.target).clone().requires_grad_();
          auto loss = kl(x, t, red, log_target);
          loss.backward(at::ones_like(loss));
          grads[d][0] = x.grad().cpu();
          grads[d][1] = t.grad().cpu();
        }
        check_close(grads[1][0], grads[0][0], 1e-10, 1e-13, what + ", d/d input");
        check_close(grads[1][1], grads[0][1], 1e-10, 1e-13, what + ", d/d target");
      } catch (const std::exception& e) {
        check(false, what + ": threw " + e.what());
      }
    }
  }
  // Zero-probability rule on CUDA.
  {
    const double inf = std::numeric_limits<double>::infinity();
    auto x = at::tensor({-inf, -1.0, -1.0}, at::kDouble).to(dev);
    auto t = at::tensor({0.0, 0.5, 0.5}, at::kDouble).to(dev);
    auto out = kl(x, t, "none", false).cpu();
    check(out[0].item<double>() == 0.0, "cuda: zero-probability rule (loss at p == 0 is not 0)");
  }
  return true;
}

// Per-row generalized JSD (TRL's convention) with ATen ops, in double.
at::Tensor logits_reference(const at::Tensor& input, const at::Tensor& target, double beta, double temperature) {
  const auto lq = at::log_softmax(input.to(at::kDouble) / temperature, -1);
  const auto lp = at::log_softmax(target.to(at::kDouble) / temperature, -1);
  const auto kl_rows = [](const at::Tensor& la, const at::Tensor& lb) { return (la.exp() * (la - lb)).sum(-1); };
  if (beta == 0.0) return kl_rows(lp, lq);
  if (beta == 1.0) return kl_rows(lq, lp);
  const auto lm = at::logsumexp(at::stack({lp + std::log(beta), lq + std::log1p(-beta)}), 0);
  return beta * kl_rows(lp, lm) + (1 - beta) * kl_rows(lq, lm);
}

void test_logits() {
  for (double beta : {0.0, 1.0, 0.3}) {
    const std::string what = str("kl_with_logits beta=", beta);
    try {
      auto x = at::randn({3, 4, 37}, at::kDouble).requires_grad_();
      auto t = at::randn({3, 4, 37}, at::kDouble).requires_grad_();
      auto rows = kl_with_logits(x, t, beta, 2.0, "none");
      check_close(rows, logits_reference(x, t, beta, 2.0), 1e-10, 1e-12, what + " 'none'");
      // Gradients of both arguments through the C++ autograd Function.
      auto w = at::rand({3, 4}, at::kDouble);
      (rows * w).sum().backward();
      auto xr = x.detach().clone().requires_grad_(), tr = t.detach().clone().requires_grad_();
      (logits_reference(xr, tr, beta, 2.0) * w).sum().backward();
      check(x.grad().defined() && t.grad().defined(), what + ": gradient not defined");
      if (x.grad().defined() && t.grad().defined()) {
        check_close(x.grad(), xr.grad(), 1e-9, 1e-12, what + " grad input");
        check_close(t.grad(), tr.grad(), 1e-9, 1e-12, what + " grad target");
      }
      // A mask drops rows; 'batchmean' divides by the rows kept.
      auto mask = at::rand({3, 4}) > 0.3;
      const double kept = std::max<double>(1.0, mask.sum().item<double>());
      check_close(kl_with_logits(x.detach(), t.detach(), beta, 1.0, "batchmean", mask),
                  (logits_reference(x, t, beta, 1.0) * mask).sum() / kept, 1e-10, 1e-12, what + " masked batchmean");
    } catch (const std::exception& e) {
      check(false, what + ": threw " + e.what());
    }
  }
  check_double_backward_raises(
      [](const at::Tensor& x, const at::Tensor& t) { return kl_with_logits(x, t, 0.3, 2.0, "batchmean"); },
      Case{at::randn({3, 9}, at::kDouble), at::randn({3, 9}, at::kDouble)}, "kl_with_logits: double backward");
  try {
    kl_with_logits(at::randn({2, 5}), at::randn({2, 5}), 0.0, 0.0, "batchmean");
    check(false, "kl_with_logits: temperature 0: no exception");
  } catch (const c10::ValueError& e) {
    check(std::string(e.what()).find("temperature") != std::string::npos,
          str("kl_with_logits: temperature 0: message does not name the argument: ", e.what()));
  } catch (const std::exception& e) {
    check(false, str("kl_with_logits: temperature 0: not a c10::ValueError: ", e.what()));
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const char* require_cuda = std::getenv("BATCHKL_REQUIRE_CUDA");
  try {
    // The library must have registered the op (i.e. the linker kept it).
    c10::Dispatcher::singleton().findSchemaOrThrow("batchkl::kl", "");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: batchkl::kl is not registered (was libbatchkl.so linked/loaded?): %s\n", e.what());
    return 1;
  }
  test_values();
  test_autograd();
  test_zero_probability();
  test_errors();
  test_logits();
  const bool cuda_ran = test_cuda();
  if (!cuda_ran && require_cuda && std::string(require_cuda) == "1") {
    check(false, "BATCHKL_REQUIRE_CUDA=1 but the CUDA-vs-CPU checks were skipped");
  }
  if (g_failures) {
    std::fprintf(stderr, "test_kl: %d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  std::printf("test_kl: all %d checks passed%s\n", g_checks, cuda_ran ? " (CPU and CUDA)" : " (CPU)");
  return 0;
}
