// CPU backend of `batchkl::kl*`: tiles of a row in parallel (at::parallel_for),
// SIMD over the columns where every operand is unit-stride, a strided scalar
// loop otherwise. Loss sums are per tile in a fixed order and combined in a
// fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../kl.h"
#include "../register_backend.h"
#include "prefault.h"
#include "vec_ops.h"

namespace batchkl {
namespace {

template <typename scalar_t, Mode kMode, bool kLog>
struct TileWorker {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;

  const KLLaunch& p;
  acc_t scale;  // kReduce: 1 / grad_divisor, folded into the gradients

  // One tile: n columns starting at the given element pointers. Returns the
  // tile's loss sum (kReduce) or 0.
  acc_t run(scalar_t* const (&ptr)[kNumOperands], const int64_t (&stride)[kNumOperands], int64_t n) const {
    const bool gx = ptr[kGradInput] != nullptr, gt = ptr[kGradTarget] != nullptr;
    // The backward of 'none' reads the input only for the target's gradient:
    // the input's, -t (or -exp(t)) times grad_output, does not depend on it.
    const bool reads_input = kMode != Mode::kBackward || gt;
    bool unit = true;
    for (int k = 0; k < kNumOperands; ++k) unit &= ptr[k] == nullptr || stride[k] == 1;
    acc_t total = 0;
    int64_t j = 0;
    if (unit) {
      Acc acc[IO::kVecs] = {Acc(0), Acc(0)};
      const Acc vscale(scale);
      // IO::kWidth elements from x, t (and grad_output g), results to o (the
      // loss, or the input's gradient) and ot (the target's gradient).
      const auto step = [&](const scalar_t* x, const scalar_t* t, const scalar_t* g, scalar_t* o, scalar_t* ot_out) {
        Acc xv[IO::kVecs], tv[IO::kVecs], gv[IO::kVecs], ox[IO::kVecs], ot[IO::kVecs];
        if (reads_input) {
          IO::load(x, xv);
        } else {
          for (auto& v : xv) v = Acc(0);
        }
        IO::load(t, tv);
        if constexpr (kMode == Mode::kBackward) IO::load(g, gv);
        for (int v = 0; v < IO::kVecs; ++v) {
          const KLTerm<kLog, Acc, VecOpsFor<scalar_t>> term(tv[v]);
          if constexpr (kMode == Mode::kElementwise) {
            ox[v] = term.loss(xv[v]);
          } else {
            Acc s = vscale;
            if constexpr (kMode == Mode::kBackward) s = gv[v];
            if constexpr (kMode == Mode::kReduce) acc[v] = acc[v] + term.loss(xv[v]);
            if (gx) ox[v] = term.grad_input() * s;
            if (gt) ot[v] = term.grad_target(xv[v]) * s;
          }
        }
        if (kMode == Mode::kElementwise || gx) IO::store(o, ox[0], ox[1]);
        if (kMode != Mode::kElementwise && gt) IO::store(ot_out, ot[0], ot[1]);
      };
      scalar_t* const out = kMode == Mode::kElementwise ? ptr[kOut] : ptr[kGradInput];
      for (; j + IO::kWidth <= n; j += IO::kWidth) {
        step(ptr[kInput] + j, ptr[kTarget] + j, kMode == Mode::kBackward ? ptr[kOut] + j : nullptr,
             out ? out + j : nullptr, ptr[kGradTarget] ? ptr[kGradTarget] + j : nullptr);
      }
      if (j < n) {
        // The tail through the same vector math, on a copy padded with
        // zero-probability entries (loss and gradient 0): the same element
        // gets the same bits wherever a tile's end falls. 'none' and its
        // backward walk the whole tensor as one run, so where the ends fall
        // depends on the batch, and the scalar functions (logf, expf) round
        // differently from the vector ones: a row's elementwise loss changed
        // with the rows beside it.
        const int64_t m = n - j;
        alignas(64) scalar_t xb[IO::kWidth], tb[IO::kWidth], gb[IO::kWidth], ob[IO::kWidth], otb[IO::kWidth];
        std::fill_n(xb, IO::kWidth, scalar_t(0));
        std::fill_n(tb, IO::kWidth, kLog ? -std::numeric_limits<scalar_t>::infinity() : scalar_t(0));
        std::fill_n(gb, IO::kWidth, scalar_t(0));
        if (reads_input) std::copy_n(ptr[kInput] + j, m, xb);
        std::copy_n(ptr[kTarget] + j, m, tb);
        if constexpr (kMode == Mode::kBackward) std::copy_n(ptr[kOut] + j, m, gb);
        step(xb, tb, gb, ob, otb);
        if (out) std::copy_n(ob, m, out + j);
        if (kMode != Mode::kElementwise && gt) std::copy_n(otb, m, ptr[kGradTarget] + j);
        j = n;
      }
      if constexpr (kMode == Mode::kReduce) {
        // Fixed-order horizontal sum: deterministic for a given tile.
        alignas(64) acc_t lanes[Acc::size()];
        (acc[0] + acc[1]).store(lanes);
        for (int64_t l = 0; l < Acc::size(); ++l) total += lanes[l];
      }
    }
    // A strided tile, one element at a time: thousands of elements summed
    // one by one, so it accumulates in double (in float32 the running sum's
    // rounding grows with the tile) and in blocks of kBlock terms whose sums
    // the total then takes: near-equal terms round the same way at every
    // step, so a plain running sum's error grows with n (float64 inputs, no
    // wider than their accumulator: 1.2e-13 of the terms' magnitude over 8100
    // of them), the blocks' with kBlock + n / kBlock. Still one fixed order.
    constexpr int64_t kBlock = 64;
    double scalar_total = 0, block = 0;
    [[maybe_unused]] int64_t in_block = 0;
    for (; j < n; ++j) {
      const acc_t x = reads_input ? static_cast<acc_t>(ptr[kInput][j * stride[kInput]]) : acc_t(0);
      const KLTerm<kLog, acc_t> term(static_cast<acc_t>(ptr[kTarget][j * stride[kTarget]]));
      if constexpr (kMode == Mode::kElementwise) {
        ptr[kOut][j * stride[kOut]] = static_cast<scalar_t>(term.loss(x));
      } else {
        acc_t s = scale;
        if constexpr (kMode == Mode::kBackward) s = static_cast<acc_t>(ptr[kOut][j * stride[kOut]]);
        if constexpr (kMode == Mode::kReduce) {
          block += static_cast<double>(term.loss(x));
          if (++in_block == kBlock) {
            scalar_total += block;
            block = 0;
            in_block = 0;
          }
        }
        if (gx) ptr[kGradInput][j * stride[kGradInput]] = static_cast<scalar_t>(term.grad_input() * s);
        if (gt) ptr[kGradTarget][j * stride[kGradTarget]] = static_cast<scalar_t>(term.grad_target(x) * s);
      }
    }
    return total + static_cast<acc_t>(scalar_total + block);
  }
};

template <typename scalar_t, Mode kMode, bool kLog>
void run_cpu(const KLLaunch& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowGeometry& g = p.geo;
  const int64_t ntiles = g.num_tiles();
  std::vector<acc_t> partials(kMode == Mode::kReduce ? ntiles : 0);
  const TileWorker<scalar_t, kMode, kLog> worker{p, static_cast<acc_t>(1.0 / p.grad_divisor)};
  // About 32k elements per task: enough to amortise the scheduling.
  const int64_t grain = std::max<int64_t>(1, 32768 / g.chunk);
  // A tile's place in the rows x cols walk, and where it starts in operand k.
  struct Tile {
    int64_t row, col0, n;
  };
  const auto tile_at = [&](int64_t tile) {
    const int64_t row = tile / g.chunks_per_row;
    const int64_t col0 = (tile - row * g.chunks_per_row) * g.chunk;
    return Tile{row, col0, std::min(g.chunk, g.cols - col0)};
  };
  const auto start = [&](int k, const Tile& t) -> scalar_t* {
    auto* base = static_cast<scalar_t*>(p.ptr[k]);
    return base ? base + g.row_offset(k, t.row) + t.col0 * g.col_stride[k] : nullptr;
  };
  at::parallel_for(0, ntiles, grain, [&](int64_t begin, int64_t end) {
    // The outputs this call allocated (never grad_output, kOut of kBackward)
    // are dense in tile order: this chunk of tiles writes one span of each.
    const Tile first = tile_at(begin), last = tile_at(end - 1);
    for (const int k : {int(kGradInput), int(kGradTarget), kMode == Mode::kElementwise ? int(kOut) : -1}) {
      if (k < 0 || p.ptr[k] == nullptr) continue;
      scalar_t* from = start(k, first);
      scalar_t* to = start(k, last) + (last.n - 1) * g.col_stride[k] + 1;
      if (to > from) populate_for_write(from, (to - from) * sizeof(scalar_t));
    }
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile t = tile_at(tile);
      const int64_t n = t.n;
      scalar_t* ptr[kNumOperands];
      int64_t stride[kNumOperands];
      for (int k = 0; k < kNumOperands; ++k) {
        ptr[k] = start(k, t);
        stride[k] = g.col_stride[k];
      }
      const acc_t s = worker.run(ptr, stride, n);
      if constexpr (kMode == Mode::kReduce) partials[tile] = s;
    }
  });
  if constexpr (kMode == Mode::kReduce) {
    if (p.row_out != nullptr) {
      auto* out = static_cast<scalar_t*>(p.row_out);
      at::parallel_for(0, g.rows, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t s = 0;
          for (int64_t c = 0; c < g.chunks_per_row; ++c) s += partials[r * g.chunks_per_row + c];
          out[r] = static_cast<scalar_t>(s);
        }
      });
    } else {
      // One sequential pass over the tile sums, in double: a fixed order, so
      // bitwise reproducible whatever the thread count.
      double total = 0;
      for (const acc_t s : partials) total += static_cast<double>(s);
      *static_cast<scalar_t*>(p.scalar_out) = static_cast<scalar_t>(total / p.divisor);
    }
  }
}

void launch_cpu(const KLLaunch& p) {
  dispatch_mode(p, [&](auto mode, auto log) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "batchkl_kl_cpu",
                                    [&] { run_cpu<scalar_t, decltype(mode)::value, decltype(log)::value>(p); });
  });
}

// grad (contiguous, `rows` rows) *= scale[row], multiplied in the gradient's
// math type (float32 for 16-bit gradients), the scale given in that type or
// the gradient's own (scale_t): the product is rounded once, and in place --
// an ATen mul_ of a bf16 tensor by a float32 one would go through two
// full-size float32 temporaries.
template <typename scalar_t, typename scale_t>
void scale_rows(scalar_t* grad, int64_t rows, int64_t cols, const scale_t* scale, bool per_row) {
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto s = static_cast<at::opmath_type<scalar_t>>(scale[per_row ? r : 0]);
      if (s == 1) continue;  // the usual loss.backward(): no pass at all
      scalar_t* g = grad + r * cols;
      int64_t j = 0;
      for (; j + IO::kWidth <= cols; j += IO::kWidth) {
        Acc v[IO::kVecs];
        IO::load(g + j, v);
        IO::store(g + j, v[0] * Acc(s), v[1] * Acc(s));
      }
      for (; j < cols; ++j) g[j] = static_cast<scalar_t>(static_cast<decltype(s)>(g[j]) * s);
    }
  });
}

void scale_cpu(at::Tensor& grad, const at::Tensor& scale) {
  // One scale per row of the last dim, or one for all (kl_scale_impl checked which).
  const int64_t cols = grad.dim() == 0 ? 1 : std::max<int64_t>(grad.size(-1), 1);
  const int64_t rows = grad.numel() / cols;
  const bool per_row = scale.numel() == rows && rows > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "batchkl_scale_cpu", [&] {
    // (kl_scale_impl gave it one of the two.)
    if (scale.scalar_type() == grad.scalar_type()) {
      scale_rows(grad.data_ptr<scalar_t>(), rows, cols, scale.const_data_ptr<scalar_t>(), per_row);
    } else {
      scale_rows(grad.data_ptr<scalar_t>(), rows, cols, scale.const_data_ptr<at::opmath_type<scalar_t>>(), per_row);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(batchkl, CPU, m) { register_backend<launch_cpu, scale_cpu>(m); }

}  // namespace batchkl
