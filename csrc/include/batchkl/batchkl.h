// batchkl's C++ API: the two ops, called through the dispatcher, so that a
// libtorch program calls them as Python calls torch.ops.batchkl.* (the same
// kernels, autocast and C++ autograd). Header only: link batchkl::batchkl
// (libbatchkl.so), whose loading registers the ops; with no library loaded a
// call throws c10::Error naming the missing op.
//
//   #include <batchkl/batchkl.h>
//   at::Tensor loss = batchkl::kl(log_q, p, "batchmean");       // F.kl_div's semantics, plus "row"
//   at::Tensor jsd = batchkl::kl_with_logits(student, teacher, /*beta=*/0.5);
//   (loss + jsd).backward();
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>

namespace batchkl {

// The ops' C++ signatures, as their schemas (csrc/schema.cpp) declare them.
using KLSignature = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, bool);
using KLWithLogitsSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, c10::string_view,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                                         std::optional<at::ScalarType>);

// torch.ops.batchkl.kl: F.kl_div(input, target, reduction=..., log_target=...)
// (input: log-probabilities), with the zero-probability rule and one more
// reduction, "row" (the KL of each distribution along the last dim).
inline at::Tensor kl(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction = "mean",
                     bool log_target = false) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("batchkl::kl", "").typed<KLSignature>();
  return op.call(input, target, reduction, log_target);
}

// torch.ops.batchkl.kl_with_logits: with P = softmax(target / T) (teacher)
// and Q = softmax(input / T) (student), beta = 0 gives KL(P || Q), beta = 1
// KL(Q || P), otherwise GKD's generalized JSD; reduction "none" gives one
// value per row. mask drops rows; num_items_in_batch, when given, divides the
// sum over kept rows instead of the reduction; probs reads the rows as
// (unnormalised) probabilities instead of logits; dtype: of the result.
inline at::Tensor kl_with_logits(const at::Tensor& input, const at::Tensor& target, double beta = 0.0,
                                 double temperature = 1.0, c10::string_view reduction = "batchmean",
                                 const std::optional<at::Tensor>& mask = std::nullopt,
                                 const std::optional<at::Tensor>& num_items_in_batch = std::nullopt,
                                 bool probs = false, std::optional<at::ScalarType> dtype = std::nullopt) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("batchkl::kl_with_logits", "").typed<KLWithLogitsSignature>();
  return op.call(input, target, beta, temperature, reduction, mask, num_items_in_batch, probs, dtype);
}

}  // namespace batchkl
