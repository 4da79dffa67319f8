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
  // NaN-propagating, as at::vec::maximum / minimum are.
  static C10_HOST_DEVICE inline T max(T a, T b) { return a != a ? a : (a > b ? a : b); }
  static C10_HOST_DEVICE inline T min(T a, T b) { return a != a ? a : (a < b ? a : b); }
  static C10_HOST_DEVICE inline T min_normal() { return std::numeric_limits<T>::min(); }
};

template <>
struct MathOps<float> : ScalarMathOps<float> {
  static C10_HOST_DEVICE inline float log(float v) { return ::logf(v); }
  static C10_HOST_DEVICE inline float exp(float v) { return ::expf(v); }
  static C10_HOST_DEVICE inline float log1p(float v) { return ::log1pf(v); }
  // The log of a value known to be a normal number (or inf, or NaN): a
  // backend may take a cheaper log that need not handle subnormals (CUDA).
  static C10_HOST_DEVICE inline float log_normal(float v) { return ::logf(v); }
};

template <>
struct MathOps<double> : ScalarMathOps<double> {
  static C10_HOST_DEVICE inline double log(double v) { return ::log(v); }
  static C10_HOST_DEVICE inline double exp(double v) { return ::exp(v); }
  static C10_HOST_DEVICE inline double log1p(double v) { return ::log1p(v); }
  static C10_HOST_DEVICE inline double log_normal(double v) { return ::log(v); }
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

// ---------------------------------------------------------------------------
// kl_with_logits: divergences between the softmax distributions of two rows.
//
// P is the teacher (target), Q the student (input). Which divergence, in the
// convention of TRL's GKDTrainer.generalized_jsd_loss:
//   kForward  beta = 0:  KL(P || Q)
//   kReverse  beta = 1:  KL(Q || P)
//   kJSD      else:      beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
enum class Divergence : int { kForward = 0, kReverse = 1, kJSD = 2 };

// One element of a row, given the normalised log-probabilities and
// probabilities of both distributions (the kernel gets them from the row's
// log-normaliser). Produces the element's share of the divergence and the
// derivatives of the row's divergence D w.r.t. log q_j and log p_j *as free
// variables*:
//   gq = dD/dlog q_j,  gp = dD/dlog p_j.
// The gradient w.r.t. the logits then follows from the softmax Jacobian,
//   dD/da_j = gq_j - q_j * sum_k gq_k     (and the same for b with gp, p),
// where the row sums are -1 a priori for the distribution a divergence only
// reads through log (Q in kForward, P in kReverse) and otherwise come out of
// the kernel's accumulation sweep. (The vector types of a backend plug in
// through MathOps, as for KLTerm; JSD also needs max, min, min_normal, log1p
// and log_normal.)
//
// Zero-probability rule, as in KLTerm: an entry whose probability is exactly
// 0 (a -inf logit, or an underflow) contributes 0 to the divergence and to
// the derivatives, where the naive formula gives 0 * inf = NaN. A NaN
// probability is not 0 and propagates.
template <typename T>
struct JSDWeights {
  T beta, one_minus_beta;          // of P and Q in M
  T log_beta, log_one_minus_beta;  // their logs, for M in log space (kProbs)
};

// Whether the gradients need row totals of gq / gp (see LogitsTerm) that
// only a full sweep of the row gives: the distribution a divergence reads only
// through log (Q in kForward, P in kReverse) has its total at -1 a priori.
constexpr bool needs_row_totals(Divergence div, bool grad_q, bool grad_p) {
  return (grad_q && div != Divergence::kForward) || (grad_p && div != Divergence::kReverse);
}

// dD / d(raw value) from g = dD / dlog pr, the probability pr, the raw value
// and the row total c of g (LogitsTerm), `scale` folding in the reduction's
// divisor: for a logit (1 / T in scale), (g - pr c) * scale; for an
// unnormalised probability x, where pr / x = 1 / sum, (g / x - c / sum) *
// scale, with g / x = 0 where g = 0 (the zero-probability rule).
template <bool kProbs, typename T, typename Ops = MathOps<T>>
C10_HOST_DEVICE inline T raw_grad(const T& g, const T& pr, const T& raw, const T& c, const T& inv_sum,
                                  const T& scale) {
  if constexpr (kProbs) {
    const T zero = Ops::splat(0.f);
    return (Ops::select(Ops::eq(g, zero), zero, g / raw) - c * inv_sum) * scale;
  } else {
    return (g - pr * c) * scale;
  }
}

// kProbs: the rows hold probabilities (LogitsLaunch::probs), not logits.
template <Divergence kDiv, typename T, typename Ops = MathOps<T>, bool kProbs = false>
struct LogitsTerm {
  T loss, gq, gp;

  C10_HOST_DEVICE inline LogitsTerm(T log_q, T q, T log_p, T p, const JSDWeights<T>& w) {
    if constexpr (kDiv != Divergence::kJSD) {
      *this = LogitsTerm(log_p - log_q, q, p);
    } else {
      const T zero = Ops::splat(0.f);
      T log_m;
      if constexpr (kProbs) {
        // log m = logsumexp(log p + log beta, log q + log(1 - beta)), in log
        // space: exact where a given probability is subnormal, as the
        // gradient w.r.t. a probability needs (it divides the term by the
        // probability, raw_grad). (Where both are -inf this is NaN, but then
        // p = q = 0 and both terms select 0.)
        const T lp = log_p + w.log_beta, lq = log_q + w.log_one_minus_beta;
        const T hi = Ops::max(lp, lq);
        log_m = hi + Ops::log1p(Ops::exp(Ops::min(lp, lq) - hi));
      } else {
        // From logits, log m from m = beta p + (1 - beta) q itself: one log
        // per element, where the log-space form takes an exp and a log1p,
        // whose polynomial was most of the CUDA kernel's work (2026-11-27,
        // sm_90 bfloat16: 62-75 instructions per element in each of its two
        // term sweeps, and local-memory spills; 25-35 and none this way).
        // log p - log m then carries the relative error of p and q (their
        // exp's) besides the logs' roundings; either form leaves fewer
        // digits where beta or 1 - beta is near 0 (a term of order beta from
        // a difference of logs of order log p). m is floored at the smallest
        // normal number, so that its log is finite and cheap where m is
        // subnormal (where p and q are both 0 the selects below drop the
        // terms anyway): a term there is off by at most that number / e
        // (beta p log(min / (beta p)) <= min / e), and so is its logit's
        // gradient, which takes the term as it is. A NaN passes the floor.
        log_m = Ops::log_normal(Ops::max(w.beta * p + w.one_minus_beta * q, Ops::min_normal()));
      }
      gp = w.beta * Ops::select(Ops::eq(p, zero), zero, p * (log_p - log_m));
      gq = w.one_minus_beta * Ops::select(Ops::eq(q, zero), zero, q * (log_q - log_m));
      loss = gp + gq;
    }
  }

  // The two KLs read log p and log q only through log p - log q, which a
  // kernel may have cheaper (and more exactly) than the two terms.
  C10_HOST_DEVICE inline LogitsTerm(T log_p_minus_log_q, T q, T p) {
    static_assert(kDiv != Divergence::kJSD, "JSD needs log p and log q");
    const T zero = Ops::splat(0.f);
    if constexpr (kDiv == Divergence::kForward) {
      loss = Ops::select(Ops::eq(p, zero), zero, p * log_p_minus_log_q);
      gq = zero - p;
      gp = loss + p;
    } else {
      loss = Ops::select(Ops::eq(q, zero), zero, q * (zero - log_p_minus_log_q));
      gq = loss + q;
      gp = zero - q;
    }
  }
};

}  // namespace batchkl
