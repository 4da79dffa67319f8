// A libtorch program using the installed batchkl: <batchkl/batchkl.h>, the
// two ops, gradients through their C++ autograd; values against ATen in
// double. Exits 1 on any mismatch.
#include <ATen/ATen.h>
#include <batchkl/batchkl.h>

#include <cstdio>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, const char* what) {
  if (!at::allclose(got, want, 1e-10, 1e-12)) {
    std::fprintf(stderr, "consumer: FAIL: %s: max abs diff %g\n", what, (got - want).abs().max().item<double>());
    ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::log_softmax(at::randn({4, 11}, opts), -1).requires_grad_();
  const auto p = at::softmax(at::randn({4, 11}, opts), -1);
  auto loss = batchkl::kl(x, p, "batchmean");
  loss.backward();
  expect_close(loss, (p * (p.log() - x.detach())).sum() / 4.0, "kl batchmean");
  expect_close(x.grad(), -p / 4.0, "kl batchmean d/d input");

  auto s = at::randn({4, 11}, opts).requires_grad_();
  const auto t = at::randn({4, 11}, opts);
  auto rows = batchkl::kl_with_logits(s, t, /*beta=*/0.0, /*temperature=*/2.0, "none");
  const auto lq = at::log_softmax(s.detach() / 2.0, -1), lp = at::log_softmax(t / 2.0, -1);
  expect_close(rows, (lp.exp() * (lp - lq)).sum(-1), "kl_with_logits forward KL per row");
  rows.sum().backward();
  expect_close(s.grad(), (lq.exp() - lp.exp()) / 2.0, "kl_with_logits d/d student");

  if (failures) return 1;
  std::printf("consumer: batchkl from its installed package: kl and kl_with_logits OK\n");
  return 0;
}
