// Comparisons of tensors for the emulated kernels' tests
// (tests/cpp/test_kl_emulated.cpp, tests/cpp/test_logits_emulated.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <optional>
#include <string>

#include "check.h"

namespace batchkl_test {

// |a - b| <= atol + rtol |b| elementwise, NaN where the other has NaN, the
// same infinities; atol is relative to the largest finite |b|. `rounded_to`:
// the dtype `a` was computed in, where b rounded to it is exact whatever the
// tolerances say, and so is one subnormal step off it (a float16 subnormal's
// spacing, 6e-8, can be more than them where every element of b is small).
inline void check_close(const at::Tensor& a, const at::Tensor& b, double rtol, double atol_rel,
                        const std::string& what, double atol_abs = 0.0,
                        std::optional<at::ScalarType> rounded_to = std::nullopt) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    check(false, c10::str(what, ": shape/dtype ", a.sizes(), " ", a.scalar_type(), " vs ", b.sizes(), " ",
                          b.scalar_type()));
    return;
  }
  if (a.numel() == 0) return check(true, what);
  const auto x = a.to(at::kDouble), y = b.to(at::kDouble);
  const auto fin = y.isfinite();
  const double scale = fin.any().item<bool>() ? y.masked_select(fin).abs().max().item<double>() : 0.0;
  auto ok = ((x - y).abs() <= atol_abs + atol_rel * scale + rtol * y.abs()) | (x.isnan() & y.isnan()) |
            ((x == y) & y.isinf());
  if (rounded_to) {
    // b rounded to that dtype, give or take its subnormals' spacing (a float16
    // gradient's last bit there: 6e-8 absolute); also where b is beyond the
    // dtype's range, which it rounds to an infinity.
    const double spacing = *rounded_to == at::kHalf ? 0x1p-24 : *rounded_to == at::kBFloat16 ? 0x1p-133 : 0.0;
    const auto y_rounded = y.to(*rounded_to).to(at::kDouble);
    ok = ok | (x == y_rounded) | ((x - y_rounded).abs() <= spacing);
  }
  if (!ok.all().item<bool>()) {
    const auto off = (~ok).flatten();
    const int64_t first = off.nonzero()[0][0].item<int64_t>();
    check(false, c10::str(what, ": ", off.sum().item<int64_t>(), " of ", ok.numel(),
                          " elements off, first at flat index ", first, ": got ", x.flatten()[first].item<double>(),
                          ", expected ", y.flatten()[first].item<double>(), " (within ",
                          atol_abs + atol_rel * scale + rtol * std::abs(y.flatten()[first].item<double>()), ")"));
    return;
  }
  check(true, what);
}

// The same shape, dtype and values, NaN at the same places: two runs that
// must agree to the bit (a row alone and in its batch, two launch shapes).
inline bool same_values(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         (a.numel() == 0 || (at::isnan(a).equal(at::isnan(b)) &&
                             at::where(at::isnan(a), 0, a).equal(at::where(at::isnan(b), 0, b))));
}

}  // namespace batchkl_test
