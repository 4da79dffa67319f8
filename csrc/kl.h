// Host-side plan of one `batchkl::kl` kernel call, shared by the argument
// checking (kl_host.cpp), the CPU backend (cpu/) and the CUDA backend (cuda/).
//
// Every call is reduced to the same picture: up to five tensors of one
// broadcast shape, walked as `rows x cols` where cols is the last dimension
// (or, for elementwise work, whatever the coalesced layout makes innermost).
// Rows are cut into tiles of `chunk` columns; `chunk` depends on `cols`
// alone, so the order in which a row's loss is summed never depends on how
// many other rows share the batch (batch invariance) or on thread counts.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cstdint>
#include <type_traits>

#include "kl_math.h"

namespace batchkl {

constexpr int kMaxLeadDims = 6;  // more (after coalescing) falls back to .contiguous()

// Operand slots. In kElementwise mode kOut is the elementwise loss; in
// kBackward mode it is grad_output; in kReduce mode it is unused.
enum Operand : int { kInput = 0, kTarget = 1, kOut = 2, kGradInput = 3, kGradTarget = 4, kNumOperands = 5 };

struct RowGeometry {
  int64_t rows = 1;
  int64_t cols = 1;
  int64_t chunk = 1;           // columns per tile
  int64_t chunks_per_row = 1;  // ceil(cols / chunk)
  int nlead = 0;               // leading (row) dims after coalescing, innermost last
  int64_t lead_sizes[kMaxLeadDims] = {};
  int64_t lead_strides[kNumOperands][kMaxLeadDims] = {};
  int64_t col_stride[kNumOperands] = {};

  C10_HOST_DEVICE int64_t num_tiles() const { return rows * chunks_per_row; }

  // Element offset of the start of `row` in operand `k`. Division only over
  // the leading dims, once per tile, never per element.
  C10_HOST_DEVICE inline int64_t row_offset(int k, int64_t row) const {
    if (nlead == 1) return row * lead_strides[k][0];
    int64_t off = 0;
    for (int d = nlead - 1; d >= 0; --d) {
      const int64_t size = lead_sizes[d];
      const int64_t idx = row % size;
      row /= size;
      off += idx * lead_strides[k][d];
    }
    return off;
  }
};

// Everything a backend needs to run one call.
struct KLLaunch {
  Mode mode = Mode::kReduce;
  Reduction reduction = Reduction::kSum;
  bool log_target = false;
  bool want_grad_input = false;
  bool want_grad_target = false;
  c10::ScalarType dtype = c10::ScalarType::Float;
  RowGeometry geo;
  std::array<void*, kNumOperands> ptr{};  // nullptr where the slot is unused
  // kReduce: the loss is sum / divisor; gradients are scaled by
  // 1 / grad_divisor: `divisor`, or 1 where the gradients are those of the sum
  // (grads_of_sum).
  double divisor = 1.0;
  double grad_divisor = 1.0;
  void* row_out = nullptr;     // kReduce + 'row': one value per row, contiguous
  void* scalar_out = nullptr;  // kReduce + scalar reductions: a 0-d tensor
};

// Whether a fused forward of a scalar reduction stores the gradients of the
// sum, leaving the division by the reduction's divisor to the backward, which
// applies it together with grad_output in float32 and rounds once. float16
// cannot hold the divided gradients: its smallest value is 6e-8, and forward
// KL's q - p of about 1 / V, over 8192 rows of 32000 logits, is 4e-9, stored
// as 0. A GradScaler's grad_output (65536), applied only in the backward,
// could not bring a 0 back: fp16 training with loss scaling got 96% of the
// gradient zero. bfloat16 and wider have (at least) float32's range.
inline bool grads_of_sum(c10::ScalarType dtype) { return dtype == c10::ScalarType::Half; }

// A fused forward's results: the loss, the gradients w.r.t. input and target
// (empty where not asked for), and `grad_scale`, the factor the backward
// multiplies them by besides grad_output: a 0-d float32 tensor (1 / divisor)
// where grads_of_sum, else empty (the gradients are scaled already).
using FusedResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Chooses the tile width. A function of cols (and the element size) alone.
int64_t chunk_for(int64_t cols);

// Fills geo for operands that all have `shape` (expanded views). In
// kElementwise/kBackward mode dims may be reordered and merged freely (the
// layout of operand `layout_operand` leads); in kReduce mode the last dim stays
// the column dim. Returns false if more than kMaxLeadDims remain.
bool build_geometry(RowGeometry& geo, const std::array<at::Tensor, kNumOperands>& ops, at::IntArrayRef shape,
                    bool elementwise, int layout_operand);

// Calls f(mode, log_target) with both as compile-time constants
// (std::integral_constant), so a backend instantiates one kernel body per
// combination instead of branching per element.
template <typename F>
void dispatch_mode(const KLLaunch& p, F&& f) {
  const auto with_log = [&](auto mode) {
    p.log_target ? f(mode, std::true_type{}) : f(mode, std::false_type{});
  };
  switch (p.mode) {
    case Mode::kElementwise:
      return with_log(std::integral_constant<Mode, Mode::kElementwise>{});
    case Mode::kReduce:
      return with_log(std::integral_constant<Mode, Mode::kReduce>{});
    case Mode::kBackward:
      return with_log(std::integral_constant<Mode, Mode::kBackward>{});
  }
}

// The op entry points (kl_host.cpp); `launch` is the backend.
using Launcher = void (*)(const KLLaunch&);
// grad (contiguous, rows x cols) *= scale (rows values, or 1), skipping rows whose scale is 1.
using Scaler = void (*)(at::Tensor& grad, const at::Tensor& scale);
void kl_scale_impl(at::Tensor& grad, const at::Tensor& scale, Scaler scaler);

FusedResult kl_fused_impl(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction,
                          bool log_target, bool want_grad_input, bool want_grad_target, Launcher launch);

std::tuple<at::Tensor, at::Tensor> kl_none_backward_impl(const at::Tensor& grad, const at::Tensor& input,
                                                         const at::Tensor& target, bool log_target,
                                                         bool want_grad_input, bool want_grad_target,
                                                         Launcher launch);

Reduction parse_reduction(c10::string_view reduction);

// Shared argument checks: `op` names the op in the message.
void check_float(const at::Tensor& t, const char* op, const char* name);
[[noreturn]] void unsupported_device(const char* op, const at::Tensor& t);

}  // namespace batchkl
