// Pointwise KL math shared by the CPU and CUDA kernels.
//
// Written once, templated on the value type `T`, so the scalar code (CUDA
// threads, CPU tails and strided loops) and the CPU's SIMD code
// (at::vec::Vectorized<float/double>) compute the very same formulas. A value
// type plugs in by specialising `MathOps<T>`; the scalar float/double
// specialisations live here, the SIMD ones in cpu/vec_ops.h.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace batchkl {

// What a kernel invocation computes. Shared by host code (which picks it) and
// both backends (which are templated on it).
enum class Mode : int {
  kElementwise = 0,  // reduction='none': out = loss per element
  kReduce = 1,       // every other reduction: loss summed per row + fused grads
  kBackward = 2,     // reduction='none' backward: grads scaled by grad_output
};

// Reductions of the drop-in op, in the order the schema string parser returns.
enum class Reduction : int { kNone = 0, kSum = 1, kMean = 2, kBatchMean = 3, kRow = 4 };

template <typename T>
struct MathOps;

// What float and double share; each adds its own log/exp (logf/expf, log/exp).
template <typename T>
struct ScalarMathOps {
  using Mask = bool;
  static C10_HOST_DEVICE inline T select(bool m, T a, T b) { return m ? a : b; }
  static C10_HOST_DEVICE inline bool eq(T a, T b) { return a == b; }
  static C10_HOST_DEVICE inline T splat(T v) { return v; }
};

template <>
struct MathOps<float> : ScalarMathOps<float> {
  static C10_HOST_DEVICE inline float log(float v) { return ::logf(v); }
  static C10_HOST_DEVICE inline float exp(float v) { return ::expf(v); }
};

template <>
struct MathOps<double> : ScalarMathOps<double> {
  static C10_HOST_DEVICE inline double log(double v) { return ::log(v); }
  static C10_HOST_DEVICE inline double exp(double v) { return ::exp(v); }
};

// The loss term of one element and its two partial derivatives.
//
// x = input (log q). t = target: a probability p, or log p when kLogTarget.
//   loss   = p * (log p - x)
//   d/dx   = -p
//   d/dt   = log p + 1 - x           (t = p)
//          = p * (log p - x + 1)     (t = log p)
//
// Zero-probability rule: where p is exactly 0 (t == 0, or t == -inf with
// kLogTarget) the loss and both derivatives are 0 whatever x is. PyTorch gives
// NaN there (0 * inf), which is the limit-free answer but the wrong one: the
// limit of p log p as p -> 0 is 0. A NaN in t is not a zero probability and
// still propagates.
template <bool kLogTarget, typename T, typename Ops = MathOps<T>>
struct KLTerm {
  T prob;      // p
  T log_prob;  // log p
  typename Ops::Mask zero;

  C10_HOST_DEVICE inline explicit KLTerm(T t) {
    if constexpr (kLogTarget) {
      prob = Ops::exp(t);
      log_prob = t;
      zero = Ops::eq(t, Ops::splat(-std::numeric_limits<float>::infinity()));
    } else {
      prob = t;
      log_prob = Ops::log(t);
      zero = Ops::eq(t, Ops::splat(0.f));
    }
  }

  C10_HOST_DEVICE inline T loss(T x) const {
    return Ops::select(zero, Ops::splat(0.f), prob * (log_prob - x));
  }
  // -p is already 0 (or -0) where p == 0, so no select is needed.
  C10_HOST_DEVICE inline T grad_input() const { return Ops::splat(0.f) - prob; }
  C10_HOST_DEVICE inline T grad_target(T x) const {
    if constexpr (kLogTarget) {
      return Ops::select(zero, Ops::splat(0.f), prob * (log_prob - x + Ops::splat(1.f)));
    } else {
      return Ops::select(zero, Ops::splat(0.f), log_prob + Ops::splat(1.f) - x);
    }
  }
};

}  // namespace batchkl
