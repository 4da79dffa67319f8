// SIMD value types for the shared math of kl_math.h, on at::vec::Vectorized:
// the same formulas as the scalar code, 8 (AVX2) or 16 (AVX-512) lanes at a time.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16-math.h>

#include <limits>
#include <type_traits>

#include "../kl_math.h"

namespace batchkl {

template <typename T>
struct VecMathOps {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static inline V log(const V& v) { return v.log(); }
  static inline V exp(const V& v) { return v.exp(); }
  static inline V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static inline Mask eq(const V& a, const V& b) { return a == b; }
  static inline V splat(T v) { return V(v); }
  static inline V log1p(const V& v) { return v.log1p(); }
  static inline V log_normal(const V& v) { return v.log(); }
  static inline V min_normal() { return V(std::numeric_limits<T>::min()); }
  static inline V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static inline V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
};

template <>
struct MathOps<at::vec::Vectorized<float>> : VecMathOps<float> {};
template <>
struct MathOps<at::vec::Vectorized<double>> : VecMathOps<double> {};

// For half and bfloat16 inputs: ATen's exp_u20 (a few float32 ulp, far below
// what a 16-bit input can resolve) at about half the cost of SLEEF's u10.
// exp_u20 clamps its argument: NaN and overflow to +inf are restored here, and
// between -inf and about -87 (where it gives 0 but the true value is a float32
// denormal or one of the smallest normals, and 0 * -inf would turn into NaN)
// the rare vector falls back to u10. exp_u20 scales by 2^(n - 1), n the
// nearest integer to x / ln 2, built in the exponent field: 0 for n = -126,
// so its zeros start at -125.5 ln 2 = -86.99, above ln(FLT_MIN) = -87.34
// (exp(-87) came out 0, a kl term exp(t) * (t - x) at x = -inf NaN where
// PyTorch gives +inf; seen once 'none' tiles' tails took this path too).
struct ReducedFloatVecOps : MathOps<at::vec::Vectorized<float>> {
  static inline V exp(const V& v) {
    constexpr float kLnFltMax = 88.72283905206835f;
    constexpr float kExpU20Min = -86.5f;  // below -86.99, with a margin
    const V overflow = v > V(kLnFltMax);
    V e = V::blendv(V::blendv(v.exp_u20(), V(std::numeric_limits<float>::infinity()), overflow), v, v.isnan());
    const V tiny = (v < V(kExpU20Min)) & (v != V(-std::numeric_limits<float>::infinity()));  // exp(-inf) = 0 is exact
    if (tiny.zero_mask() != (1 << V::size()) - 1) e = V::blendv(e, v.exp(), tiny);
    return e;
  }
};

// The vector math for a storage type: full precision for float and double.
template <typename scalar_t>
using VecOpsFor = std::conditional_t<c10::is_reduced_floating_point_v<scalar_t>, ReducedFloatVecOps,
                                     MathOps<at::vec::Vectorized<at::opmath_type<scalar_t>>>>;

// Loads / stores kSteps * Acc::size() elements of scalar_t as accumulator
// vectors (float for every type but double; half and bfloat16 widen on load).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = at::vec::Vectorized<acc_t>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kWidth = kVecs * Acc::size();

  static inline void load(const scalar_t* p, Acc (&v)[kVecs]) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v[0] = Acc::loadu(p);
      v[1] = Acc::loadu(p + Acc::size());
    } else {
      static_assert(at::vec::Vectorized<scalar_t>::size() == kWidth, "reduced float vector width");
      std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    }
  }
  static inline void store(scalar_t* p, const Acc& a, const Acc& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + Acc::size());
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }
};

}  // namespace batchkl
