// Host-side plan of one `batchkl::kl_with_logits` call, shared by the argument
// checking (kl_logits_host.cpp) and the backends.
//
// The picture: `rows` distributions of `cols` logits each, for the student
// (input) and the teacher (target), at any row strides (RowGeometry). Each row
// is normalised in a first sweep (its log-sum-exp, computed online), and
// its divergence and gradients come out of a second; a divergence whose
// gradient needs a row total that depends on both normalisers (see
// LogitsTerm in kl_math.h) writes the gradients in a third.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <type_traits>

#include "kl.h"

namespace batchkl {

struct LogitsLaunch {
  Divergence div = Divergence::kForward;
  // The rows hold (unnormalised) probabilities instead of logits: the
  // normaliser is a plain sum and log is taken per element (kl_divergence).
  bool probs = false;
  bool want_grad_input = false;
  bool want_grad_target = false;
  c10::ScalarType dtype = c10::ScalarType::Float;
  RowGeometry geo;  // operands kInput, kTarget, kGradInput, kGradTarget; kOut unused
  std::array<void*, kNumOperands> ptr{};
  const bool* mask = nullptr;  // one flag per row, contiguous; nullptr keeps every row
  double beta = 0.0;
  double inv_temperature = 1.0;
  // The reduced loss is sum / divisor, and the gradients are scaled by
  // 1 / divisor (unless grad_scale_out is set). `divisor` is multiplied by the number of kept rows (at least
  // 1) when `divide_by_kept_rows`, and replaced by *num_items (a float64
  // scalar on the inputs' device) when that is set: a backend reads both
  // itself, so that the host never waits for the device.
  double divisor = 1.0;
  bool divide_by_kept_rows = false;
  const double* num_items = nullptr;
  // The result in float64, whatever the inputs' dtype (the host rounds it
  // once, to the dtype asked for).
  double* row_out = nullptr;     // per-row losses (reduction 'none'), contiguous
  double* scalar_out = nullptr;  // a single value otherwise
  // Set (with scalar_out) where the gradients are those of the sum
  // (grads_of_sum): they are not divided, and 1 / divisor goes here, for the
  // backward.
  float* grad_scale_out = nullptr;
};

using LogitsLauncher = void (*)(const LogitsLaunch&);

// Calls f(divergence, probs) with both as compile-time constants
// (std::integral_constant), so a backend instantiates one kernel body per
// combination instead of branching per element.
template <typename F>
void dispatch_logits(const LogitsLaunch& p, F&& f) {
  const auto with_probs = [&](auto div) {
    p.probs ? f(div, std::true_type{}) : f(div, std::false_type{});
  };
  switch (p.div) {
    case Divergence::kForward:
      return with_probs(std::integral_constant<Divergence, Divergence::kForward>{});
    case Divergence::kReverse:
      return with_probs(std::integral_constant<Divergence, Divergence::kReverse>{});
    case Divergence::kJSD:
      return with_probs(std::integral_constant<Divergence, Divergence::kJSD>{});
  }
}

FusedResult kl_with_logits_fused_impl(
    const at::Tensor& input, const at::Tensor& target, double beta, double temperature, c10::string_view reduction,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& num_items_in_batch, bool probs,
    std::optional<at::ScalarType> out_dtype, bool want_grad_input, bool want_grad_target, LogitsLauncher launch);

}  // namespace batchkl
