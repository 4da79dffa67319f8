// CPU backend of `batchkl::kl_with_logits*`: rows in parallel
// (at::parallel_for), each row swept by one thread, SIMD across it.
//
// A row is swept two or three times and the later sweeps find it in cache:
// (1) the log-normaliser of both distributions, online (running max,
// rescaled sum of exp), leaving the exps in a row-sized scratch; (2) the
// divergence and, where the gradient's row constant is known a priori, the
// gradients; otherwise (3) the gradients, with the row sums of (2). No
// N x V temporary: the only full-size writes are the gradients returned.
//
// Every element of a row goes through the same vector code (the tail is
// padded with entries of probability 0), every sum is taken in one fixed
// order, and a row is never split between threads, so a row's results are
// bitwise the same whatever the batch around it and the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../kl_logits.h"
#include "../register_backend.h"
#include "prefault.h"
#include "vec_ops.h"

namespace batchkl {
namespace {

// exp is the hot operation (one per element and distribution in sweep 1,
// one more for JSD on probabilities in sweep 2): ATen's ~20-ulp float32 exp, whose error is far
// below what a loss resolves. Its arguments here are <= 0 (x - running max),
// and its two shortcuts are harmless: it flushes results below FLT_MIN to 0
// (probability 0, the log-probability being computed without exp), and a
// NaN argument gives garbage -- but a NaN anywhere in a row also makes the
// row's max NaN, and with it every probability of the row.
struct FastExpOps : MathOps<at::vec::Vectorized<float>> {
  static inline V exp(const V& v) { return v.exp_u20(); }
};
template <typename scalar_t>
using LogitsOpsFor =
    std::conditional_t<std::is_same_v<scalar_t, double>, MathOps<at::vec::Vectorized<double>>, FastExpOps>;

template <typename Acc>
double hsum(const Acc& v) {
  alignas(64) typename Acc::value_type lanes[Acc::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t l = 0; l < Acc::size(); ++l) s += static_cast<double>(lanes[l]);
  return s;
}

template <typename Acc>
typename Acc::value_type hmax(const Acc& v) {
  alignas(64) typename Acc::value_type lanes[Acc::size()];
  v.store(lanes);
  auto m = lanes[0];
  for (int64_t l = 1; l < Acc::size() && !std::isnan(m); ++l) {
    if (std::isnan(lanes[l]) || lanes[l] > m) m = lanes[l];
  }
  return m;
}

// What sweep 1 leaves for the later ones, per distribution:
//   logits: log q_j = (x_j - shift) / T - log_sum,  shift = the row's max logit
//   probs:  log q_j = log x_j - log_sum
// and, in the thread's row scratch, e_j with q_j = e_j * f[block of j]:
//   logits: e_j = exp((x_j - running max at that block) / T), f = exp((that max - shift) / T) / sum
//   probs:  e_j = x_j,                                         f = 1 / sum
// so that the later sweeps get q_j with a multiply instead of an exp.
// The logit's distance from the max is taken before it is scaled by 1 / T:
// exact near the max, and rounded relative to the distance, not to the
// logit. (Scaled first, x_j / T carried the rounding of the logit's own size:
// logits around 1e9 at T = 0.7 lost every digit of their differences, a
// JSD came out -56; and x_j / T overflowed for logits near float's largest
// value at T < 1: NaN rows.)
template <typename acc_t>
struct Normaliser {
  acc_t shift = 0, log_sum = 0, inv_sum = 0;
  acc_t* e = nullptr;
  acc_t* f = nullptr;
};

// One thread's scratch: a few arrays of one row's length (in cache while
// the row is swept; never N x V).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> eq, ep, gq, gp, fq, fp;
  void resize(int64_t padded, int64_t blocks, bool third_sweep) {
    for (auto* v : {&eq, &ep}) v->resize(padded);
    for (auto* v : {&gq, &gp}) v->resize(third_sweep ? padded : 0);
    for (auto* v : {&fq, &fp}) v->resize(blocks);
  }
};

template <typename scalar_t, Divergence kDiv, bool kProbs>
struct RowKernel {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  using Ops = LogitsOpsFor<scalar_t>;
  static constexpr int64_t kW = IO::kWidth;
  // Sums run in float32 lanes over a block, then in double across blocks.
  static constexpr int64_t kBlock = 1024;
  static_assert(kBlock % kW == 0, "block of whole vectors");
  static constexpr int64_t kS = Acc::size();

  // Fills the lanes past the end of a row: probability 0 either way.
  static constexpr acc_t kFill = kProbs ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();

  acc_t inv_t;                // 1 / T (1 for probs)
  JSDWeights<Acc> w;
  acc_t scale;                // 1 / divisor (unless grad_scale_out), and 1 / T for logits
  bool want_gx, want_gy;

  static int64_t padded(int64_t n) { return (n + kW - 1) / kW * kW; }
  static int64_t blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }
  // Whether the gradients wait for the row sums of sweep 2.
  bool third_sweep() const { return needs_row_totals(kDiv, want_gx, want_gy); }

  // kW elements from p (n of them valid) as accumulator vectors.
  static inline void load(const scalar_t* p, int64_t n, Acc (&v)[IO::kVecs]) {
    if (n >= kW) return IO::load(p, v);
    scalar_t buf[kW];
    for (int64_t j = 0; j < kW; ++j) buf[j] = j < n ? p[j] : static_cast<scalar_t>(kFill);
    IO::load(buf, v);
  }
  static inline void store(scalar_t* p, int64_t n, const Acc (&v)[IO::kVecs]) {
    if (n >= kW) return IO::store(p, v[0], v[1]);
    scalar_t buf[kW];
    IO::store(buf, v[0], v[1]);
    std::memcpy(p, buf, n * sizeof(scalar_t));
  }

  // Sweep 1 over one distribution.
  Normaliser<acc_t> normalise(const scalar_t* r, int64_t n, acc_t* e, acc_t* f) const {
    Normaliser<acc_t> out;
    out.e = e;
    out.f = f;
    double sum = 0;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t b = 0, b0 = 0; b0 < n; ++b, b0 += kBlock) {
      const int64_t len = std::min(kBlock, n - b0);
      const int64_t end = b0 + padded(len);
      if constexpr (kProbs) {
        Acc s(0);
        for (int64_t j = b0; j < end; j += kW) {
          Acc v[IO::kVecs];
          load(r + j, b0 + len - j, v);
          for (int i = 0; i < IO::kVecs; ++i) {
            v[i].store(e + j + i * kS);
            s = s + v[i];
          }
        }
        sum += hsum(s);
        continue;
      }
      // Online log-sum-exp: the block max (cheap), then one exp per element
      // against the running max; the running sum is rescaled when it moves.
      Acc vmax(-std::numeric_limits<acc_t>::infinity());
      for (int64_t j = b0; j < end; j += kW) {
        Acc v[IO::kVecs];
        load(r + j, b0 + len - j, v);
        for (int i = 0; i < IO::kVecs; ++i) {
          vmax = at::vec::maximum(vmax, v[i]);
          v[i].store(e + j + i * kS);
        }
      }
      const acc_t bm = hmax(vmax);
      if (std::isnan(bm) || bm > m) {
        sum *= std::exp((static_cast<double>(m) - static_cast<double>(bm)) * inv_t);  // 0 while m was -inf
        m = bm;
      }
      f[b] = m;
      if (m == -std::numeric_limits<acc_t>::infinity()) {
        // Only -inf so far: probability 0 (exp(-inf - -inf) would be NaN).
        std::fill(e + b0, e + end, acc_t(0));
        continue;
      }
      Acc s(0);
      const Acc vm(m), vt(inv_t);
      for (int64_t j = b0; j < end; j += kS) {
        const Acc ev = Ops::exp((Acc::loadu(e + j) - vm) * vt);
        ev.store(e + j);
        s = s + ev;
      }
      sum += hsum(s);
    }
    // A row of -inf only (m = -inf, sum = 0) has no distribution: its log
    // probabilities come out as -inf - (-inf) = NaN, as in PyTorch.
    out.shift = m;
    out.log_sum = static_cast<acc_t>(std::log(sum));
    out.inv_sum = static_cast<acc_t>(1.0 / sum);
    for (int64_t b = 0; b < blocks(n); ++b) {
      f[b] = kProbs ? out.inv_sum
                    : static_cast<acc_t>(std::exp((static_cast<double>(f[b]) - static_cast<double>(m)) * inv_t) / sum);
    }
    return out;
  }

  static bool undefined(const Normaliser<acc_t>& nz) {
    return std::isnan(nz.shift) || nz.shift == std::numeric_limits<acc_t>::infinity();
  }

  // The element's term from the loaded values x, y and probabilities q, p.
  inline LogitsTerm<kDiv, Acc, Ops, kProbs> term(const Acc& x, const Acc& q, const Normaliser<acc_t>& nq, const Acc& y,
                                         const Acc& p, const Normaliser<acc_t>& np, const Acc& c) const {
    if constexpr (kDiv == Divergence::kJSD || kProbs) {
      return LogitsTerm<kDiv, Acc, Ops, kProbs>(log_prob(x, nq), q, log_prob(y, np), p, w);
    } else {
      // log p - log q with each side shifted by its own max first: exact
      // where x is its row's max (a V = 1 row gives exactly 0).
      return LogitsTerm<kDiv, Acc, Ops, kProbs>(((y - Acc(np.shift)) - (x - Acc(nq.shift))) * Acc(inv_t) - c, q, p);
    }
  }

  inline Acc log_prob(const Acc& v, const Normaliser<acc_t>& nz) const {
    if constexpr (kProbs) {
      return Ops::log(v) - Acc(nz.log_sum);
    } else {
      return (v - Acc(nz.shift)) * Acc(inv_t) - Acc(nz.log_sum);
    }
  }

  // d D / d(raw value) (kl_math.h's raw_grad); e is the raw value for probs.
  inline Acc raw_grad(const Acc& g, const Acc& pr, const Acc& e, acc_t c, const Normaliser<acc_t>& nz) const {
    return batchkl::raw_grad<kProbs, Acc, Ops>(g, pr, e, Acc(c), Acc(nz.inv_sum), Acc(scale));
  }

  struct Sums {
    double loss = 0, gq = 0, gp = 0;
  };

  // Sweep 2: the divergence and the row sums of gq, gp; with kWrite the
  // gradients too (row constants -1), else, for sweep 3, gq and gp go to
  // the scratch.
  template <bool kWrite>
  Sums accumulate(const scalar_t* x, const scalar_t* y, scalar_t* gx, scalar_t* gy, int64_t n,
                  const Normaliser<acc_t>& nq, const Normaliser<acc_t>& np, acc_t* gq_out, acc_t* gp_out,
                  const scalar_t* next_x, const scalar_t* next_y) const {
    Sums sums;
    // For the two KLs from logits: log p - log q = ((y - shift_p) - (x - shift_q)) / T - c.
    const Acc c(static_cast<acc_t>(static_cast<double>(np.log_sum) - static_cast<double>(nq.log_sum)));
    for (int64_t b = 0, b0 = 0; b0 < n; ++b, b0 += kBlock) {
      const int64_t len = std::min(kBlock, n - b0);
      const int64_t end = b0 + padded(len);
      const Acc fq(nq.f[b]), fp(np.f[b]);
      Acc s_loss(0), s_gq(0), s_gp(0);
      for (int64_t j = b0; j < end; j += kW) {
        Acc xv[IO::kVecs], yv[IO::kVecs], ox[IO::kVecs], oy[IO::kVecs];
        if (next_x != nullptr) {
          // Sweep 1 of the next row streams it from memory and would stall
          // there; fetching it into L2 now overlaps that with this sweep's
          // arithmetic (the current row is served from cache).
          __builtin_prefetch(next_x + j, 0, 2);
          __builtin_prefetch(next_y + j, 0, 2);
        }
        load(x + j, b0 + len - j, xv);
        load(y + j, b0 + len - j, yv);
        for (int i = 0; i < IO::kVecs; ++i) {
          const int64_t at = j + i * kS;
          const Acc eq = Acc::loadu(nq.e + at), ep = Acc::loadu(np.e + at);
          const Acc q = eq * fq, p = ep * fp;
          const LogitsTerm<kDiv, Acc, Ops, kProbs> t = term(xv[i], q, nq, yv[i], p, np, c);
          s_loss = s_loss + t.loss;
          if constexpr (!kWrite) {  // the row constants sweep 3 needs
            s_gq = s_gq + t.gq;
            s_gp = s_gp + t.gp;
          }
          if constexpr (kWrite) {
            if (gx) ox[i] = raw_grad(t.gq, q, eq, -1, nq);
            if (gy) oy[i] = raw_grad(t.gp, p, ep, -1, np);
          } else {
            if (gq_out) t.gq.store(gq_out + at);
            if (gp_out) t.gp.store(gp_out + at);
          }
        }
        if constexpr (kWrite) {
          if (gx) store(gx + j, b0 + len - j, ox);
          if (gy) store(gy + j, b0 + len - j, oy);
        }
      }
      sums.loss += hsum(s_loss);
      if constexpr (!kWrite) {
        sums.gq += hsum(s_gq);
        sums.gp += hsum(s_gp);
      }
    }
    return sums;
  }

  // Sweep 3: the gradients from the scratch alone.
  void write(scalar_t* out, int64_t n, const Normaliser<acc_t>& nz, const acc_t* g, acc_t c) const {
    for (int64_t b = 0, b0 = 0; b0 < n; ++b, b0 += kBlock) {
      const int64_t len = std::min(kBlock, n - b0);
      const int64_t end = b0 + padded(len);
      const Acc f(nz.f[b]);
      for (int64_t j = b0; j < end; j += kW) {
        Acc o[IO::kVecs];
        for (int i = 0; i < IO::kVecs; ++i) {
          const int64_t at = j + i * kS;
          const Acc e = Acc::loadu(nz.e + at);
          o[i] = raw_grad(Acc::loadu(g + at), e * f, e, c, nz);
        }
        store(out + j, b0 + len - j, o);
      }
    }
  }

  // The divergence of one row; writes its gradient rows (gx / gy may be null).
  // next_x / next_y: the next row this thread will run (or null), prefetched.
  double row(const scalar_t* x, const scalar_t* y, scalar_t* gx, scalar_t* gy, int64_t n, Scratch<acc_t>& sc,
             const scalar_t* next_x, const scalar_t* next_y) const {
    const Normaliser<acc_t> nq = normalise(x, n, sc.eq.data(), sc.fq.data());
    const Normaliser<acc_t> np = normalise(y, n, sc.ep.data(), sc.fp.data());
    if (!kProbs && (undefined(nq) || undefined(np))) {
      // A +inf logit (or a NaN) leaves no distribution: NaN for the row and
      // its gradients, as PyTorch gives, rather than a sum that the zero-
      // probability rule could turn into +inf with NaN gradients.
      const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
      if (gx) std::fill(gx, gx + n, nan);
      if (gy) std::fill(gy, gy + n, nan);
      return std::numeric_limits<double>::quiet_NaN();
    }
    if (!third_sweep()) return accumulate<true>(x, y, gx, gy, n, nq, np, nullptr, nullptr, next_x, next_y).loss;
    const Sums s = accumulate<false>(x, y, nullptr, nullptr, n, nq, np, gx ? sc.gq.data() : nullptr,
                                     gy ? sc.gp.data() : nullptr, next_x, next_y);
    const bool cq_known = kDiv == Divergence::kForward, cp_known = kDiv == Divergence::kReverse;
    if (gx) write(gx, n, nq, sc.gq.data(), cq_known ? acc_t(-1) : static_cast<acc_t>(s.gq));
    if (gy) write(gy, n, np, sc.gp.data(), cp_known ? acc_t(-1) : static_cast<acc_t>(s.gp));
    return s.loss;
  }
};

template <typename scalar_t, Divergence kDiv, bool kProbs>
void run_logits_cpu(const LogitsLaunch& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowGeometry& g = p.geo;
  const int64_t rows = g.rows, cols = g.cols;

  double divisor = p.divisor;
  if (p.num_items != nullptr) {
    divisor = *p.num_items;
  } else if (p.divide_by_kept_rows) {
    int64_t kept = 0;
    for (int64_t r = 0; r < rows; ++r) kept += p.mask[r];
    divisor *= static_cast<double>(std::max<int64_t>(kept, 1));
  }

  RowKernel<scalar_t, kDiv, kProbs> k;
  k.inv_t = static_cast<acc_t>(p.inv_temperature);
  using Acc = typename RowKernel<scalar_t, kDiv, kProbs>::Acc;
  const double b = p.beta;
  k.w = JSDWeights<Acc>{Acc(static_cast<acc_t>(b)), Acc(static_cast<acc_t>(1.0 - b)),
                        Acc(static_cast<acc_t>(std::log(b))), Acc(static_cast<acc_t>(std::log1p(-b)))};
  k.scale = static_cast<acc_t>((kProbs ? 1.0 : p.inv_temperature) / (p.grad_scale_out ? 1.0 : divisor));
  k.want_gx = p.want_grad_input;
  k.want_gy = p.want_grad_target;

  auto* const base_x = static_cast<const scalar_t*>(p.ptr[kInput]);
  auto* const base_y = static_cast<const scalar_t*>(p.ptr[kTarget]);
  auto* const base_gx = static_cast<scalar_t*>(p.ptr[kGradInput]);
  auto* const base_gy = static_cast<scalar_t*>(p.ptr[kGradTarget]);
  const int64_t sx = g.col_stride[kInput], sy = g.col_stride[kTarget];

  // Straight into the output for 'none' (a float64 tensor of the rows).
  std::vector<double> sums(p.row_out != nullptr ? 0 : rows);
  double* const row_loss = p.row_out != nullptr ? p.row_out : sums.data();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // A row whose last dim is strided is gathered here, so that it runs
    // through the very same vector code as a contiguous one.
    std::vector<scalar_t> gather_x(sx == 1 ? 0 : cols), gather_y(sy == 1 ? 0 : cols);
    Scratch<acc_t> scratch;
    scratch.resize(k.padded(cols), k.blocks(cols), k.third_sweep());
    // The gradients are dense: this chunk of rows writes one span of each.
    for (const int op : {int(kGradInput), int(kGradTarget)}) {
      auto* base = static_cast<scalar_t*>(p.ptr[op]);
      if (base) populate_for_write(base + g.row_offset(op, begin), (end - begin) * cols * sizeof(scalar_t));
    }
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gx = base_gx ? base_gx + g.row_offset(kGradInput, r) : nullptr;
      scalar_t* gy = base_gy ? base_gy + g.row_offset(kGradTarget, r) : nullptr;
      if (p.mask != nullptr && !p.mask[r]) {
        // Excluded: 0 loss and 0 gradient whatever the row holds.
        if (gx) std::memset(static_cast<void*>(gx), 0, cols * sizeof(scalar_t));
        if (gy) std::memset(static_cast<void*>(gy), 0, cols * sizeof(scalar_t));
        row_loss[r] = 0;
        continue;
      }
      const scalar_t* x = base_x + g.row_offset(kInput, r);
      const scalar_t* y = base_y + g.row_offset(kTarget, r);
      if (sx != 1) {
        for (int64_t j = 0; j < cols; ++j) gather_x[j] = x[j * sx];
        x = gather_x.data();
      }
      if (sy != 1) {
        for (int64_t j = 0; j < cols; ++j) gather_y[j] = y[j * sy];
        y = gather_y.data();
      }
      const bool prefetch = r + 1 < end && sx == 1 && sy == 1 && (p.mask == nullptr || p.mask[r + 1]);
      row_loss[r] = k.row(x, y, gx, gy, cols, scratch, prefetch ? base_x + g.row_offset(kInput, r + 1) : nullptr,
                          prefetch ? base_y + g.row_offset(kTarget, r + 1) : nullptr);
    }
  });

  if (p.scalar_out != nullptr) {
    double total = 0;  // in row order: reproducible whatever the thread count
    for (int64_t r = 0; r < rows; ++r) total += row_loss[r];
    *p.scalar_out = total / divisor;
    if (p.grad_scale_out != nullptr) *p.grad_scale_out = static_cast<float>(1.0 / divisor);
  }
}

void launch_logits_cpu(const LogitsLaunch& p) {
  dispatch_logits(p, [&](auto div, auto probs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "batchkl_kl_with_logits_cpu",
                                    [&] { run_logits_cpu<scalar_t, decltype(div)::value, decltype(probs)::value>(p); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, CPU, m) { register_logits_backend<launch_logits_cpu>(m); }

}  // namespace batchkl
