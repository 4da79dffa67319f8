// Device code of `batchkl::kl_with_logits` on CUDA, and the host-side choice
// of its launch shape. Kept apart from the launcher (kl_logits_cuda.cu) so
// that tests/cpp/test_logits_emulated.cpp can run this very code on the CPU
// (tests/cpp/cuda_emulator.h), where no GPU is at hand.
//
// The picture: a row (one distribution pair, `cols` logits each) belongs to a
// group of threads, part of a warp for short rows (several rows per warp),
// else a CTA,
// or on Hopper a thread-block cluster of up to 8 CTAs, each CTA owning one
// slice of the row. Where the slice fits in shared memory, it is copied
// there (contiguous aligned rows: asynchronously, each thread copying the
// packs it reads; other rows through registers, keeping the source's offset
// within 16 bytes) and every sweep reads it from there; otherwise (a warp's
// short row, a slice too large) from global memory. A group sweeps its row
//   1. for both online log-sum-exps (running max and rescaled sum);
//   2. for the divergence and, when the gradient's row constant is known a
//      priori (LogitsTerm in kl_math.h), the gradients;
//   3. only when it is not (JSD, and the target gradient of forward KL, the
//      input gradient of reverse KL): the gradients, with the row sums of 2.
// The group's totals are combined in a fixed order (warp butterfly, warps in
// order, cluster ranks in order; the cluster's CTAs trade them through
// distributed shared memory), every thread ends up with the same bits, and
// the work a thread does depends on `cols` and the dtype alone: results are
// bitwise reproducible and a row's result does not depend on the batch
// around it. The scalar loss is the sum of the row losses, added up in a
// fixed order by the last CTA to finish (an integer ticket; no float atomics).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../kl_logits.h"
#include "../kl_math.h"

#if !defined(BATCHKL_CUDA_EMULATOR) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define BATCHKL_CLUSTERS 1
#elif defined(BATCHKL_CUDA_EMULATOR)
#define BATCHKL_CLUSTERS 1
#endif

#if defined(BATCHKL_CUDA_EMULATOR)
// The emulator hands each emulated CTA its own buffer, and checks that every
// 16-byte access is aligned (x86 would not fault where a GPU does).
#define BATCHKL_DYNAMIC_SMEM(name) unsigned char* name = ::batchkl_emu::dynamic_smem()
#define BATCHKL_CHECK_ALIGNED(p) ::batchkl_emu::check_aligned(p)
// The rows whose writing sweep read kept log-ratios (LaunchKnobs::keep),
// which the emulated tests count: a path that never runs passes any
// comparison of its results with the path beside it.
#define BATCHKL_COUNT_KEPT_ROW() (++::batchkl_emu::kept_rows)
#else
#define BATCHKL_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define BATCHKL_CHECK_ALIGNED(p) ((void)0)
#define BATCHKL_COUNT_KEPT_ROW() ((void)0)
#endif

namespace batchkl {
namespace logits_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows up to this many columns get a warp each, or a part of one: a CTA per
// row would leave most of its threads idle, and a short row is re-read from
// L1 (or L2).
constexpr int64_t kWarpRowCols = 2048;
// 16-bit rows get a warp up to this many bytes per operand too (4096
// columns): each lane then reads 16 packs per operand, as on a float32 row of
// 2048 columns, the longest row measured on a warp. H200, 2026-11-27 (commit
// 51383ea), forward + backward queued, the same 67M elements in rows of 2048
// (a warp each) and of 4096 (a CTA each): forward KL bfloat16 0.193 against
// 0.303 ms, JSD 0.271 against 0.495. A CTA per row of 4096 took as long in
// bfloat16 as in float32 (0.303 and 0.317 ms; JSD 0.495 and 0.504): the same
// 16 values per thread and three CTA-wide exchanges per row, so per-row
// costs, not bytes, set its time; a warp per float32 row of 2048 ran at 55%
// of copy bandwidth (0.343 ms for twice the bytes). Inferred from those
// neighbours, not yet timed at 4096 itself (BATCHKL_LOGITS_WARP_ROW_COLS=2048
// gives the plan from before 2026-11-29). float16 (the same bytes and math as
// bfloat16) was not measured. float32 keeps 2048 until timed: its CTA rows of
// 4096 ran at 60%.
constexpr int64_t kWarpRowBytes = 8 * 1024;
// A short row gets as many lanes (a power of two up to 32) as give each about
// this many 16-byte packs per operand: two sweep-1 steps of kUnroll loads.
// With a whole warp on a row of 512 bfloat16 logits (2 packs a lane), the
// per-row work (three butterflies of doubles, the row constants) outweighed
// the sweeps, and a lane had 4 loads in flight (H100, 2026-11-26: 32% of
// copy bandwidth).
constexpr int64_t kPacksPerLane = 8;
constexpr int kMaxCluster = 8;  // the portable cluster size
// A CTA's slice (both operands) is aimed at this many bytes of shared
// memory, so that several CTAs fit on an SM (the kernel's launch bounds ask
// for two) and one streams its slice in while another computes; a longer row
// is cut into more CTAs, up to kMaxCluster.
constexpr int64_t kSliceBudget = 64 * 1024;
constexpr int kUnroll = 4;  // 16-byte loads in flight per operand and thread from global memory

// One exchange slot: up to 4 doubles.
struct alignas(16) Slot {
  double v[4];
};
// A CTA's slots for one exchange: one per warp, the CTA's total (read by
// the cluster's other CTAs) and the cluster's total (gathered by warp 0).
constexpr int kSlotsPerExchange = kWarps + 2;
// Exchanges per row: the maxes, the rescaled sums, the divergence sums.
constexpr int kExchanges = 3;
// The kAhead kernel's clusters go up to 16 CTAs where the GPU allows sizes
// beyond the portable 8 (Hopper does, for a kernel that asks).
constexpr int kMaxClusterAhead = 16;
// Shared memory: the epilogue's block sum, then the exchanges' slots, then
// the row loss's shares of a cluster's CTAs (rank 0's are read), then the
// staged slice. The kAhead kernel has the shares of ranks 8-15 after
// kFixedSmem, then its two mbarriers (one per stage; 16 bytes, so that the
// stages stay 16-byte aligned), then its stages. (Room for 16 shares in
// every kernel would move the default plans' shared-memory thresholds.)
constexpr size_t kFinalBytes = kThreads * sizeof(double) + 16;
constexpr size_t kExchangeBytes = kExchanges * kSlotsPerExchange * sizeof(Slot);
constexpr size_t kShareBytes = kMaxCluster * sizeof(double);
constexpr size_t kFixedSmem = kFinalBytes + kExchangeBytes + kShareBytes;
constexpr size_t kAheadBarriers = kFixedSmem + (kMaxClusterAhead - kMaxCluster) * sizeof(double);
constexpr size_t kAheadFixedSmem = kAheadBarriers + 16;

// How a call is cut up; a function of the row length, the dtype and the
// device (plan_grid), never of the number of rows.
struct Grid {
  bool warp_rows = false;
  int lanes = 32;       // threads per row when warp_rows (1 to 32, a power of two)
  int cluster = 1;      // CTAs per row
  int64_t slice = 0;    // columns per CTA, a whole number of 16-byte packs
  bool stage = false;   // the slice stays in shared memory between sweeps
  int64_t blocks = 1;
  size_t smem = 0;  // dynamic shared memory per CTA
  bool lean = true;   // the forward KL's lean sweep (RowWork::lean_step) where it applies
  bool share = true;  // a cluster adds its CTAs' loss shares up in rank 0 (no broadcast)
  bool merge = false;  // the maxes and the sums in one exchange (LseOp), not two
  bool backward = false;     // streamed rows: the sweeps after the first alternate direction (LaunchKnobs::reuse)
  bool evict_first = false;  // streamed rows: the gradient's stores (and the distillation kernel's last read) evict-first
  bool prefetch = false;     // a kDistill kernel's rows double-buffered: its kAhead twin (LaunchKnobs::prefetch)
  bool keep = false;         // JSD's staged rows keep log2 q - log2 m for the writing sweep (LaunchKnobs::keep)
};

// Where a long row's slices live between sweeps (BATCHKL_LOGITS_STAGE).
enum class StageMode {
  kAuto,       // staged where two CTAs still fit on an SM, save the distillation kernel's long rows (see plan_grid)
  kNever,      // every sweep reads global memory
  kWhereFits,  // staged wherever the slice fits in a CTA's shared memory
};

// Developer knobs for tuning runs, read from the environment once per
// process by the launcher (its tuning()).
struct LaunchKnobs {
  int64_t slice_budget = kSliceBudget;  // the bytes a CTA's slice aims at
  StageMode stage = StageMode::kAuto;   // where slices live
  int row_lanes = 0;                    // lanes per short row; 0: kPacksPerLane decides
  int64_t warp_row_cols = 0;            // rows up to this many columns on warps; 0: warp_row_cols() decides
  // The forward KL's sweeps where the target needs no gradient: 0 the
  // general one, 1 the lean one (Grid::lean), 2 the lean one in the kDistill
  // kernel (three CTAs per SM). H200, 2026-11-27, forward + backward queued:
  // 1 -> 2 took bfloat16 8192x32000 from 0.825 to 0.649 ms, 8192x128256 3.78
  // -> 2.94, 4096x256000 3.41 -> 3.10; float32 8192x32000 1.46 -> 1.14,
  // 4096x256000 6.29 -> 5.03. 3: also JSD and reverse KL from logits, the
  // student's gradient alone (or none), in kDistill kernels of their own:
  // their general sweeps compiled without the target's gradient, so that
  // they fit in 80 registers (sm_90, nvcc 13.0, bytes of spill stores: JSD
  // bfloat16 from 128 registers and 28 to 80 and 204, none in the later
  // sweeps' step loops, float32 from 127 and none to 80 and 84; reverse KL
  // bfloat16 104, float32 96, none in any inner loop), for three CTAs per
  // SM, where the forward KL's gained 8-25%. Not yet timed on a GPU, so not
  // the default; the same sweeps and sums in the same plan, so the same bits
  // as 2. (Spill figures from before JSD's lean sweeps, below, which took
  // its bfloat16 kernel's to 96 bytes.) JSD from logits, in every kernel: 0
  // its general sweeps, 1 and up its lean ones (RowWork::jsd_step,
  // 2026-11-29, not yet timed on a GPU).
  int lean = 2;
  bool share = true;                    // Grid::share
  // Grid::merge: a row's maxes and sums of exponentials exchanged at once,
  // each merge rescaling the smaller max's sum: one exchange of a row's
  // three fewer (a CTA per row: one CTA barrier fewer; a cluster: two CTA
  // barriers and one cluster barrier fewer), at a few exp2 per merge. Off:
  // H200, 2026-11-27, slower on CTA rows (forward KL bfloat16 16384x4096
  // 0.303 -> 0.382 ms, 8192x32000 0.661 -> 0.720), about even on long
  // streamed rows, JSD slower at every shape measured (16384x4096 0.495 ->
  // 0.614); short rows (65536x512 bfloat16) faster in one call, slower in
  // the next.
  bool merge = false;
  // The distillation kernel's streamed long rows on Hopper (plan_grid,
  // distill_stream_row_bytes); false: planned as the general kernel's.
  bool distill_stream = true;
  // How the sweeps after the first treat L2, where a streamed row's second
  // read may find it (rows that plan_grid streams over CTAs only: a staged
  // slice is re-read from shared memory, a warp's short row from L1, and
  // those keep the plain order and an evict-normal policy): 0 every sweep
  // forward and an evict-normal policy on the hinted accesses (the same
  // instructions: the order of 2026-11-27, with a cache policy that should
  // act as none); 1 each sweep runs opposite to the one before it, so that
  // it starts on the packs its CTA read last; 2 (the default) also the
  // 16-byte step loops' gradient stores and, in the distillation kernel,
  // their loads on the row's last read evict-first.
  // Why: the streamed distillation kernel's time matches its second read
  // coming from HBM, not L2 (H200, 2026-11-27, float32 8192x128256 in 256
  // KiB slices: 4.95 ms, i.e. 21.0 GB, 5/3 of the minimal bytes, at the
  // copy bandwidth of 4.24 TB/s; no L2 hit rate was measured). In the same
  // order as the first read, every pack's reuse distance is the ~100 MB
  // that the SMs' slices in flight read in between, twice the 50 MB L2,
  // which an LRU-like L2 keeps none of. Backward, a pack read k bytes before
  // the end of its slice is read again after about 2k (times the CTAs in
  // flight), so the slices' tails can hit; evict-first lines (dead once
  // read again, and the gradient) leave the rest of L2 to the packs still
  // to be read again. H200, 2026-11-27, bfloat16 8192x128256 (two streamed
  // CTAs per row), Nsight Compute: L2 hit rate 22% under 0, 27% under 2,
  // DRAM throughput 86% and 84% of peak, 2.54 and 2.45 ms; forward +
  // backward queued 2.57 -> 2.47 ms (float32 5.03 -> 4.87, 4096x256000
  // bfloat16 2.62 -> 2.53). Most of the second read still comes from HBM:
  // the kernel moves about 1.57 times the minimal bytes.
  int reuse = 2;
  // The distillation kernel's rows on Hopper, double-buffered (the kAhead
  // kernel): as many clusters as fit on the GPU at once, each taking rows
  // r, r + clusters, ... in turn, each CTA with two stages of its slice in
  // shared memory. While a CTA computes row r from one stage, a bulk copy
  // (cp.async.bulk, issued by one thread at the row's start, completing on
  // an mbarrier) brings its slice of the next row into the other: HBM keeps
  // reading while the row's sweeps and exchanges run, and the row is read
  // from HBM once. plan_grid gives each stage half the slice budget (32 KiB
  // by default, three CTAs per SM) and a row the fewest CTAs whose stages
  // hold it, up to 16 where the launcher got clusters beyond the portable 8
  // (max_cluster_ahead): rows up to 512 KiB, bfloat16 131072 columns (8192x
  // 32000: clusters of 4; 128256: 16), float32 65536; longer rows keep the
  // default plan. BATCHKL_LOGITS_SLICE_KIB=96 or 128 gives stages of 48 or
  // 64 KiB (two or one CTA per SM, fewer CTAs per row; rows up to 1 MiB:
  // bfloat16 256000, float32 128256 in 16).
  // Why: H200, 2026-11-27, a staged bfloat16 8192x32000 took 0.649 ms,
  // about the sum of its HBM time (0.37 ms at the copy bandwidth) and its
  // SFU time (4 exp2 per element, 16 per clock and SM: 0.25 ms), as if the
  // CTAs on an SM, which start together and do the same work, loaded and
  // computed in turn; streamed, it reads its inputs twice (0.624 ms). A
  // first version (until 2026-11-29) had each thread copy its packs of the
  // next row with cp.async into the places it had just read in the writing
  // sweep, in one stage: it needed 128 registers (two CTAs per SM), and was
  // slower (staged bfloat16 8192x32000 0.672 -> 0.846 ms, float32 1.17 ->
  // 1.37). This one adds no work to the sweeps (the distillation kernel's
  // 80 registers, three CTAs per SM), at two stages of shared memory per CTA.
  // Not yet timed on a GPU. A row's sweeps and sums are those of the same
  // slices staged once (single_stage): the same bits as that plan, which
  // cuts rows into other slices than the default plan does. Under
  // BATCHKL_LOGITS_LEAN=3 JSD's and reverse KL's kDistill kernels take the
  // same stages and kAhead twins of their own (PlanFor::kThreeSweep): their
  // staged rows' third sweep makes them more compute-bound than the forward
  // KL's (JSD: eight SFU operations per element over its sweeps, against
  // four), so they have more to gain from HBM reading on meanwhile (H200,
  // 2026-11-27: bfloat16 8192x32000 JSD 1.26 ms, 30% of copy bandwidth).
  bool prefetch = false;
  // JSD from logits on staged rows where the target needs no gradient
  // (distillation's case, in the general kernel and in LEAN=3's kDistill
  // ones): the totals sweep leaves each element's log2 q - log2 m in the
  // place of its target logit in shared memory, which no sweep reads again,
  // so that the writing sweep takes one SFU operation per element (q) where
  // it took three (q, p, log2 m): six per element over the three sweeps,
  // not eight. Why: bfloat16 8192x32000 on an H200 needs 0.50 ms at the SFU
  // rate for eight (16 per clock and SM, 132 SMs, 1.98 GHz), 0.37 ms for
  // six, against 0.37 ms for its minimal bytes at the copy bandwidth and
  // 0.436 ms for 85% of it (arithmetic, not a measurement). 0 never; 1 (the
  // default) where the place holds the value exactly (float32 and float64
  // rows: the same bits as 0); 2 also bfloat16 rows, as float16 (11
  // significant bits: the student's gradient then errs by up to 2^-11 of q
  // (1 - beta) ln2 |log2 q - log2 m| times its scale, an eighth of the
  // rounding of a bfloat16 result of that size; below 2^-14, where float16
  // is subnormal, by 2^-25 of q (1 - beta) ln2 times the scale). float16
  // rows never: their results round to 11 bits themselves, and where the
  // gradient's q (log2 q - log2 m - c) cancels, the kept value's rounding
  // outgrew their tolerance (the emulated kernels, beta = 0.9: 0.7% of an
  // element's gradient). Not yet timed on a GPU.
  int keep = 1;
};

// The longest row, in columns, that plan_grid gives a warp (or part of one).
inline int64_t warp_row_cols(int64_t elem, const LaunchKnobs& knobs) {
  return knobs.warp_row_cols > 0 ? knobs.warp_row_cols : std::max(kWarpRowCols, kWarpRowBytes / elem);
}

struct DeviceLimits {
  int sms = 1;
  size_t max_smem = 48 * 1024;  // per CTA, opted in
  bool clusters = false;        // sm_90+: thread-block clusters with distributed shared memory
  int max_cluster_ahead = kMaxCluster;  // the kAhead kernel's largest cluster (kMaxClusterAhead where allowed)
  size_t smem_per_sm = 0;       // 0: not known (kAuto then stages wherever the slice fits)
  size_t smem_reserved = 0;     // per CTA, taken by the system
  LaunchKnobs knobs;
};

// Shared memory for one operand's staged slice: the slice, plus up to 16
// bytes so that it can keep its source's offset within 16 bytes.
constexpr int64_t stage_bytes(int64_t slice, int64_t elem) { return (slice * elem + 16 + 15) / 16 * 16; }

// The distillation kernel (PlanFor::kDistill: three CTAs per SM) on Hopper streams a
// row whose two operands take more than distill_stream_row_bytes(elem), in
// slices of up to kDistillStreamBytes (fewer CTAs per row, more of each
// thread's work per row exchange; the sweeps after the first alternate
// direction so that the slices' tails are re-read from L2, see
// LaunchKnobs::reuse). H200, 2026-11-27, forward + backward queued, ms,
// the staged plan (64 KiB slices, clusters) -> streamed in 256 KiB slices
// (BATCHKL_LOGITS_STAGE=0 BATCHKL_LOGITS_SLICE_KIB=256, the same plans):
//   bfloat16 8192 x 16000 (rows of 62.5 KiB, one staged CTA) 0.319 -> 0.357,
//   24000 0.578 -> 0.502, 32000 0.671 -> 0.624, 36000 0.919 -> 0.701,
//   40000 0.993 -> 0.798, 44000 1.07 -> 0.853, 50000 1.27 -> 0.919, 64000
//   1.40 -> 1.21, 80000 1.88 -> 1.65, 96000 2.13 -> 1.87, 128256 2.99 ->
//   2.47 (the rule as default; 4096 x 256000 2.75 -> 2.53);
//   float32 8192 x 16000 0.549 -> 0.596, 20000 0.841 -> 0.764, 24000 0.884
//   -> 0.892, 32000 1.17 -> 1.19, 40000 1.53 -> 1.61, 44000 1.77 -> 1.68,
//   48000 1.77 -> 1.84, 50000 (rows of 390 KiB) 2.11 -> 1.86, 128256 5.59 ->
//   4.87; 4096 x 256000 4.93 -> 4.96.
// So 16-bit rows stream as soon as they outgrow one CTA's slice
// (kSliceBudget): every 16-bit row measured over it was faster streamed, by
// 7-28%. 4-byte rows gain or lose up to 9% either way up to 375 KiB and keep
// the staged plan up to 384 KiB (the threshold of the first measurements).
// float16 (the same bytes and math as bfloat16) and float64 were not
// measured.
constexpr int64_t kDistillStreamBytes = 256 * 1024;
constexpr int64_t distill_stream_row_bytes(int64_t elem) { return elem == 2 ? kSliceBudget : 384 * 1024; }

// Which kernel a plan is for: the rules measured for one kernel stay its own.
enum class PlanFor {
  kGeneral,  // the general kernel (and JSD's and reverse KL's kDistill kernels without copies ahead)
  kDistill,  // the forward KL's distillation kernel: its streaming rule, and double-buffered rows
  // JSD's and reverse KL's kDistill kernels (BATCHKL_LOGITS_LEAN=3): double-
  // buffered rows where LaunchKnobs::prefetch asks and they fit, else the
  // general kernel's plan (the forward KL's streaming rule was measured for
  // its two sweeps alone).
  kThreeSweep,
};

inline Grid plan_grid(int64_t rows, int64_t cols, int64_t elem, const DeviceLimits& dev,
                      PlanFor plan = PlanFor::kGeneral) {
  Grid g;
  g.lean = dev.knobs.lean >= 1;
  g.keep = dev.knobs.keep >= (elem >= 4 ? 1 : 2);
  g.share = dev.knobs.share;
  g.merge = dev.knobs.merge;
  const int64_t pack = 16 / elem;
  const auto round_up = [&](int64_t v) { return (v + pack - 1) / pack * pack; };
  if (cols <= warp_row_cols(elem, dev.knobs)) {
    g.warp_rows = true;
    g.slice = cols;
    const int64_t packs = (cols + pack - 1) / pack;
    int lanes = 1;
    while (lanes < 32 && int64_t{lanes} * kPacksPerLane < packs) lanes *= 2;
    // A group must be an aligned power-of-two part of a warp: its shuffle mask
    // and the CTA's rows depend on it (the launcher only passes such values).
    const int forced = dev.knobs.row_lanes;
    TORCH_INTERNAL_ASSERT(forced == 0 || (forced <= 32 && (forced & (forced - 1)) == 0), "row_lanes ", forced);
    g.lanes = forced > 0 ? forced : lanes;
    const int64_t rows_per_cta = kThreads / g.lanes;
    // Enough CTAs to fill every SM several times over; a grid-stride loop takes the rest.
    g.blocks = std::max<int64_t>(1, std::min<int64_t>((rows + rows_per_cta - 1) / rows_per_cta, int64_t{dev.sms} * 8));
    g.smem = kFinalBytes;
    return g;
  }
  const int max_cluster = dev.clusters ? kMaxCluster : 1;
  // A row's slice over `c` CTAs (whole packs), and the fewest CTAs, up to
  // `most` (any count, not only powers of two), whose slices of both
  // operands take at most `budget` bytes: each thread's share of a row,
  // which pays for the row's fixed costs (its exchanges, its constants), is
  // then as large as the budget allows.
  const auto slice_of = [&](int c) { return round_up((cols + c - 1) / c); };
  const auto fewest_ctas = [&](int64_t budget, int most) {
    int c = 1;
    while (c < most && 2 * slice_of(c) * elem > budget) ++c;
    return c;
  };
  // Double-buffered rows (LaunchKnobs::prefetch): bulk copies and mbarriers
  // need sm_90, which the clusters flag implies.
  if (plan != PlanFor::kGeneral && dev.clusters && dev.knobs.prefetch && dev.knobs.stage != StageMode::kNever) {
    const int64_t budget = dev.knobs.slice_budget / 2;  // per stage
    const int c = fewest_ctas(budget, std::min(dev.max_cluster_ahead, kMaxClusterAhead));
    const int64_t slice = slice_of(c);
    const size_t smem = kAheadFixedSmem + static_cast<size_t>(4 * stage_bytes(slice, elem));
    if (2 * slice * elem <= budget && smem <= dev.max_smem) {
      g.cluster = c;
      g.slice = slice;
      g.stage = true;
      g.prefetch = true;
      g.smem = smem;
      g.blocks = rows * c;  // the launcher cuts it down to the clusters that fit at once
      return g;
    }
  }
  // A slice budget or staging mode other than the default, or
  // BATCHKL_LOGITS_DISTILL_STREAM=0, turns the distillation kernel's
  // streaming rule off.
  const bool distill_stream = plan == PlanFor::kDistill && dev.clusters && dev.knobs.distill_stream &&
                              dev.knobs.stage == StageMode::kAuto && dev.knobs.slice_budget == kSliceBudget &&
                              2 * cols * elem > distill_stream_row_bytes(elem);
  const int c = fewest_ctas(distill_stream ? kDistillStreamBytes : dev.knobs.slice_budget, max_cluster);
  g.cluster = c;
  g.slice = slice_of(c);
  const size_t staged = kFixedSmem + static_cast<size_t>(2 * stage_bytes(g.slice, elem));
  g.stage = !distill_stream && dev.knobs.stage != StageMode::kNever && staged <= dev.max_smem;
  // A slice so large that one CTA fills an SM's shared memory (a row split
  // over the largest cluster: on an H100 bfloat16 rows past about 225k
  // columns, float32 past 113k) is streamed instead: two CTAs per SM reading
  // the row twice beat one CTA reading it once. H100, 2026-11-26: forward KL
  // bfloat16 4096x256000 4.67 -> 4.46 ms, JSD 11.1 -> 8.73 ms; JSD float32
  // 8192x128256 14.0 -> 13.2 ms. Measured on Hopper (clusters) only, so only
  // there.
  if (g.stage && dev.knobs.stage == StageMode::kAuto && dev.clusters && dev.smem_per_sm > 0 &&
      2 * (staged + dev.smem_reserved) > dev.smem_per_sm) {
    g.stage = false;
  }
  g.smem = g.stage ? staged : kFixedSmem;
  g.backward = !g.stage && dev.knobs.reuse >= 1;
  g.evict_first = !g.stage && dev.knobs.reuse >= 2;
  g.blocks = rows * c;
  return g;
}

// The plan of `g` (Grid::prefetch, clusters of up to 8) without its copies
// ahead: the same slices, staged once, a cluster per row on the kDistill
// kernel. The same sweeps in the same order, so the same bits: the
// launcher's fallback where the kAhead kernel's clusters do not fit.
inline void single_stage(Grid& g, int64_t rows, int64_t elem) {
  TORCH_INTERNAL_ASSERT(g.cluster <= kMaxCluster, "single_stage: a cluster of ", g.cluster);
  g.prefetch = false;
  g.smem = kFixedSmem + static_cast<size_t>(2 * stage_bytes(g.slice, elem));
  g.blocks = rows * g.cluster;
}

// The plan `g` (plan_grid's, CTAs per row) as the GPU can run it:
// `fits(grid)` says whether the grid's clusters can be co-resident (the
// launcher's occupancy query, on the kernel the grid selects). Where they
// cannot (a GPU partitioned into small slices), in turn: the kAhead
// kernel's clusters over 8 planned again within 8 (other slices: other
// bits, the same on every call here); its two stages as one on the kDistill
// kernel (single_stage: the same bits); a staged slice streamed, the same
// slices in the same order (Grid::backward / evict_first stay false: the
// same bits, so they do not depend on how the GPU is partitioned). Throws
// where not even that fits. Shared by the launcher and the emulated one.
template <class Fits>
Grid settle_plan(Grid g, int64_t rows, int64_t cols, int64_t elem, DeviceLimits dev, PlanFor plan, Fits&& fits) {
  bool fit = fits(g);
  if (!fit && g.prefetch && g.cluster > kMaxCluster) {
    dev.max_cluster_ahead = kMaxCluster;
    g = plan_grid(rows, cols, elem, dev, plan);
    fit = fits(g);
  }
  if (!fit && g.prefetch) {
    single_stage(g, rows, elem);
    fit = fits(g);
  }
  if (!fit) {
    TORCH_CHECK(g.stage, "batchkl.kl_with_logits: this GPU cannot run a cluster of ", g.cluster, " CTAs, which rows of ",
                cols, " columns need");
    g.stage = false;
    g.smem = kFixedSmem;
    TORCH_CHECK(fits(g), "batchkl.kl_with_logits: this GPU cannot run a cluster of ", g.cluster,
                " CTAs, which rows of ", cols, " columns need");
  }
  return g;
}

// The kAhead kernel's grid (Grid::prefetch): as many clusters as fit on the
// GPU at once (`resident`: the launcher's occupancy query), each taking
// every so many rows. More would wait for a free SM, with nothing copied
// ahead for their first row.
inline void cut_to_resident(Grid& g, int64_t rows, int64_t resident) {
  g.blocks = std::min<int64_t>(rows, std::max<int64_t>(resident, 1)) * g.cluster;
}

// ---------------------------------------------------------------------------
// Device helpers.

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

__device__ __forceinline__ float float_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// A pack's values in the accumulation type. bfloat16 is the top half of a
// float: reading the pack as 32-bit words gives each value in one
// instruction (a shift or a mask) where the element-wise conversion also
// extracts the half-word first. The same values either way.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void unpack(const Pack<scalar_t> pk, acc_t (&a)[Pack<scalar_t>::kSize]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t w[4];
    std::memcpy(w, &pk, sizeof w);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      a[2 * k] = float_from_bits(w[k] << 16);
      a[2 * k + 1] = float_from_bits(w[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int e = 0; e < Pack<scalar_t>::kSize; ++e) a[e] = static_cast<acc_t>(pk.v[e]);
  }
}

constexpr double kLn2 = 0.6931471805599453;

// The SFU's log2 of a float, subnormal arguments flushed to 0 (JSD's log m,
// whose argument is floored at FLT_MIN so that it never sees one).
__device__ __forceinline__ float lg2_ftz(float v) {
#if defined(BATCHKL_CUDA_EMULATOR)
  return std::log2(std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.f, v) : v);
#else
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#endif
}

// exp of float: the SFU's (a few ulp; its arguments here are <= 0, and a
// result below FLT_MIN is a probability of 0 either way). double keeps exp.
template <typename acc_t>
struct DeviceOps : MathOps<acc_t> {};
template <>
struct DeviceOps<float> : MathOps<float> {
  static __device__ __forceinline__ float exp(float v) { return __expf(v); }
  // JSD's floor of m from logits (LogitsTerm): one max.NaN where the
  // generic max takes three instructions.
  static __device__ __forceinline__ float max(float a, float b) {
#if !defined(BATCHKL_CUDA_EMULATOR) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return MathOps<float>::max(a, b);
#endif
  }
  // JSD's log m from logits, whose argument is floored at FLT_MIN
  // (LogitsTerm): the SFU's log2, flushing subnormals, times ln 2. logf's
  // accuracy path, or __logf's rescaling of subnormal arguments, would cost
  // 3-15 more instructions per element.
  static __device__ __forceinline__ float log_normal(float v) { return lg2_ftz(v) * static_cast<float>(kLn2); }
};

// The hot loops' arithmetic, one instruction each for float: 2^v on the
// SFU with results below FLT_MIN flushed to 0 (a probability that small is
// 0 either way; __expf would spend three more instructions keeping it
// subnormal), fused multiply-add, and a max that skips NaN (a NaN reaches
// the row's sum of exponentials instead, which is how sweep 1 notices it).
// log_ serves the row constants (once per row and thread).
__device__ __forceinline__ float exp2_fast(float v) {
#if defined(BATCHKL_CUDA_EMULATOR)
  const float r = std::exp2(v);
  return r < std::numeric_limits<float>::min() ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#endif
}
__device__ __forceinline__ double exp2_fast(double v) { return ::exp2(v); }
// log2 of JSD's mixture m, floored at the smallest normal number (see
// LogitsTerm: where m is subnormal its terms are off by at most that number
// / e), NaN kept: for float one max.NaN and the SFU's log2.
__device__ __forceinline__ float log2_mixture(float m) {
  return lg2_ftz(DeviceOps<float>::max(m, std::numeric_limits<float>::min()));
}
__device__ __forceinline__ double log2_mixture(double m) {
  return ::log2(MathOps<double>::max(m, std::numeric_limits<double>::min()));
}
__device__ __forceinline__ float fma_(float a, float b, float c) { return ::fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return ::fma(a, b, c); }
__device__ __forceinline__ float max_skip_nan(float a, float b) { return ::fmaxf(a, b); }
__device__ __forceinline__ double max_skip_nan(double a, double b) { return ::fmax(a, b); }
__device__ __forceinline__ float log_(float v) { return ::logf(v); }
__device__ __forceinline__ double log_(double v) { return ::log(v); }
__device__ __forceinline__ float log2_(float v) { return ::log2f(v); }
__device__ __forceinline__ double log2_(double v) { return ::log2(v); }

// Asynchronous 16-byte copies from global to shared memory (sm_80+), so that
// a CTA has its whole slice in flight at once and sweep 1 works on the packs
// that have landed while the rest stream in. (Copying through registers
// first, then sweeping: on the H200, rows staged that way ran slower per
// element than rows read twice from global memory.) They are grouped per
// thread: a thread waits for its own groups only, and only the thread that
// issued a copy reads what it wrote.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::cp_async(dst, src, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(__cvta_generic_to_global(src))
               : "memory");
#else
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's committed groups are still
// in flight. The instruction takes that count as an immediate, so a count
// above 7 waits for 7 (more than asked, never less).
__device__ __forceinline__ void cp_async_wait(int pending) {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::cp_async_wait(std::min(pending, 7));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define BATCHKL_CP_ASYNC_WAIT(n) asm volatile("cp.async.wait_group " #n ";\n" ::: "memory")
  switch (pending) {
    case 0: BATCHKL_CP_ASYNC_WAIT(0); break;
    case 1: BATCHKL_CP_ASYNC_WAIT(1); break;
    case 2: BATCHKL_CP_ASYNC_WAIT(2); break;
    case 3: BATCHKL_CP_ASYNC_WAIT(3); break;
    case 4: BATCHKL_CP_ASYNC_WAIT(4); break;
    case 5: BATCHKL_CP_ASYNC_WAIT(5); break;
    case 6: BATCHKL_CP_ASYNC_WAIT(6); break;
    default: BATCHKL_CP_ASYNC_WAIT(7); break;
  }
#undef BATCHKL_CP_ASYNC_WAIT
#else
  (void)pending;
#endif
}

// Bulk copies from global to shared memory (sm_90's cp.async.bulk), each
// completing its bytes on an mbarrier: one thread moves a CTA's slice of a
// row with two instructions, where cp.async takes an instruction per 16
// bytes in every thread (the kAhead kernel, LaunchKnobs::prefetch). Only
// code with clusters launches them (plan_grid); elsewhere they trap.
#if !defined(BATCHKL_CUDA_EMULATOR) && defined(BATCHKL_CLUSTERS)
__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// An mbarrier whose phases each take `count` arrivals (and the bytes they
// announce). Thread 0 initialises; a CTA barrier must follow before others use it.
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::mbar_init(bar, count);
#elif defined(BATCHKL_CLUSTERS)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count) : "memory");
  // So that the bulk copies' completions (the async proxy) find it initialised.
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#else
  (void)bar;
  (void)count;
  __trap();
#endif
}

// This thread's arrival on `bar`, announcing `bytes` that bulk copies will complete.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::mbar_arrive_expect_tx(bar, bytes);
#elif defined(BATCHKL_CLUSTERS)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
#else
  (void)bar;
  (void)bytes;
  __trap();
#endif
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global
// memory at `src` to this CTA's shared memory at `dst`, completing on `bar`.
// Before it, in the issuing thread: fence_proxy_async, where the CTA's
// threads last read or wrote those bytes themselves.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::bulk_copy(dst, src, bytes, bar);
#elif defined(BATCHKL_CLUSTERS)
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_address(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(smem_address(bar))
               : "memory");
#else
  (void)dst;
  (void)src;
  (void)bytes;
  (void)bar;
  __trap();
#endif
}

// Orders this thread's (and, through the barrier before it, the CTA's)
// ordinary accesses to shared memory before its later bulk copies' writes:
// they go through another proxy, which a CTA barrier alone does not order.
__device__ __forceinline__ void fence_proxy_async() {
#if !defined(BATCHKL_CUDA_EMULATOR) && defined(BATCHKL_CLUSTERS)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Until the phase of `bar` with this parity has completed (its copies have
// landed and are visible to this thread).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::mbar_wait(bar, parity);
#elif defined(BATCHKL_CLUSTERS)
  // Labels inside braces are local to them in PTX: each inlined copy has its own.
  asm volatile(
      "{\n\t"
      ".reg .pred landed;\n"
      "mbar_wait_again:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 landed, [%0], %1;\n\t"
      "@!landed bra mbar_wait_again;\n"
      "}" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
#else
  (void)bar;
  (void)parity;
  __trap();
#endif
}

// Symmetric reduction steps: op(a, b) and op(b, a) give the same bits, so
// every lane of a butterfly ends with the same value.
struct AddOp {
  template <int K>
  __device__ __forceinline__ void operator()(double (&a)[K], const double* b) const {
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] += b[k];
  }
};

// The row maxes (never NaN: sweep 1 takes them with fmax). + 0.0: a +0 / -0
// tie gives +0 on both sides of a butterfly step.
struct MaxOp {
  template <int K>
  __device__ __forceinline__ void operator()(double (&a)[K], const double* b) const {
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = (a[k] > b[k] ? a[k] : b[k]) + 0.0;
  }
};

// The merge of two online log-sum-exps, (max, sum of 2^((a - max) k2)) in
// a[2d], a[2d + 1] for operand d: the max of the maxes, and each sum
// rescaled to it, where its own max is smaller, before they are added
// (through exp2_fast in acc_t, as sweep 1 rescales). The maxes are never
// NaN (sweep 1 takes them with fmax); a +inf max makes its sum NaN already,
// and a sum whose max is -inf is 0 or NaN, kept as it is. Symmetric like
// the others: the max ties as MaxOp's, and the pairs are taken by value
// (the larger max's first), not by position, so that both lanes of a
// butterfly step evaluate the very same expression on the very same values:
// were the compiler to fuse the multiply into the add, both would agree
// still.
template <typename acc_t>
struct LseOp {
  acc_t k2;
  template <int K>
  __device__ __forceinline__ void operator()(double (&a)[K], const double* b) const {
    static_assert(K % 2 == 0, "LseOp: (max, sum) pairs");
#pragma unroll
    for (int d = 0; d < K; d += 2) {
      if (a[d] == b[d]) {
        a[d] = a[d] + 0.0;  // +0 for a +0 / -0 tie
        a[d + 1] = a[d + 1] + b[d + 1];
      } else {
        const bool a_top = a[d] > b[d];
        const double top = a_top ? a[d] : b[d], low = a_top ? b[d] : a[d];
        const double top_sum = a_top ? a[d + 1] : b[d + 1], low_sum = a_top ? b[d + 1] : a[d + 1];
        const acc_t scale = exp2_fast((static_cast<acc_t>(low) - static_cast<acc_t>(top)) * k2);
        a[d] = top + 0.0;
        a[d + 1] = top_sum + low_sum * static_cast<double>(scale);
      }
    }
  }
};

// Over the `width` lanes (a power of two up to 32) of this thread's aligned
// group within its warp. The mask names that group alone: the warp's other
// groups work on other rows and may not reach this shuffle (a row the mask
// excludes returns early).
template <int K, class Op>
__device__ __forceinline__ void warp_allreduce(double (&v)[K], Op op, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask =
      width == 32 ? 0xffffffffu : ((1u << width) - 1u) << (lane / static_cast<unsigned>(width) * width);
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    double o[K];
#pragma unroll
    for (int k = 0; k < K; ++k) o[k] = __shfl_xor_sync(mask, v[k], offset);
    op(v, o);
  }
}

__device__ __forceinline__ unsigned cluster_rank() {
#if defined(BATCHKL_CUDA_EMULATOR)
  return ::batchkl_emu::cluster_rank();
#elif defined(BATCHKL_CLUSTERS)
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

// A barrier over the cluster that also orders shared-memory writes before it
// with reads after it from any CTA of the cluster.
__device__ __forceinline__ void cluster_sync() {
#if defined(BATCHKL_CUDA_EMULATOR)
  ::batchkl_emu::cluster_sync();
#elif defined(BATCHKL_CLUSTERS)
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();  // never reached with more than one CTA per row (plan_grid)
#endif
}

// Where cluster rank `r` keeps the object that this CTA keeps at `p`.
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, unsigned r) {
#if defined(BATCHKL_CUDA_EMULATOR)
  return ::batchkl_emu::cluster_peer(p, r);
#elif defined(BATCHKL_CLUSTERS)
  return cooperative_groups::this_cluster().map_shared_rank(p, r);
#else
  (void)r;
  return p;
#endif
}

// Each warp's total in slots[warp] (and in all its lanes' `v`), visible to
// the whole CTA: the first step of cta_allreduce and cta_reduce, whose
// folds of the slots in warp order then give the same bits.
template <int K, class Op>
__device__ __forceinline__ void warps_to_slots(double (&v)[K], Op op, Slot* slots) {
  static_assert(K <= 4, "a Slot holds 4 doubles");
  warp_allreduce(v, op);
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) slots[threadIdx.x / 32].v[k] = v[k];
  }
  __syncthreads();
}

// The same total in every thread of the CTA (and of the cluster when
// `cluster` > 1). `slots`: kSlotsPerExchange Slots, used once per row.
// Across the cluster, warp 0 alone reads the other CTAs' totals (a lane per
// rank), folds them in rank order through shuffles and hands the result to
// its CTA through shared memory: one remote read per rank and CTA, not one
// per thread.
template <int K, class Op>
__device__ __forceinline__ void cta_allreduce(double (&v)[K], Op op, Slot* slots, int cluster) {
  warps_to_slots(v, op, slots);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = slots[0].v[k];
  for (int w = 1; w < kWarps; ++w) op(v, slots[w].v);
  if (cluster == 1) return;
#if !defined(BATCHKL_CLUSTERS)
  __trap();  // code without clusters launched with them (the launcher's prepare() rules it out)
#endif
  Slot* const mine = slots + kWarps;
  Slot* const total = slots + kWarps + 1;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) mine->v[k] = v[k];
  }
  cluster_sync();
  if (warp == 0) {
    double own[K] = {};
    if (lane < cluster) {
      const Slot* peer = cluster_peer(mine, static_cast<unsigned>(lane));
#pragma unroll
      for (int k = 0; k < K; ++k) own[k] = peer->v[k];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = __shfl_sync(0xffffffffu, own[k], 0);
    for (int r = 1; r < cluster; ++r) {
      double o[K];
#pragma unroll
      for (int k = 0; k < K; ++k) o[k] = __shfl_sync(0xffffffffu, own[k], r);
      op(v, o);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) total->v[k] = v[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = total->v[k];
}

// The CTA's total in thread 0 alone (the others' `v` is left partial): the
// same order as cta_allreduce's, without its broadcast. `slots`: kWarps Slots.
template <int K, class Op>
__device__ __forceinline__ void cta_reduce(double (&v)[K], Op op, Slot* slots) {
  warps_to_slots(v, op, slots);
  // Thread 0's `v` is already warp 0's total, slots[0].
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) op(v, slots[w].v);
  }
}

// Pack `i` of a run of `len` elements at `base` (column stride `stride`):
// one 16-byte access where allowed, else element by element, padded with
// `fill`. Either way a thread sees the same values in the same order.
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* base, int64_t stride, int64_t i, int64_t len,
                                                    bool vec, scalar_t fill) {
  constexpr int N = Pack<scalar_t>::kSize;
  const int64_t j0 = i * N;
  if (vec && j0 + N <= len) {
    BATCHKL_CHECK_ALIGNED(base + j0);
    return reinterpret_cast<const Pack<scalar_t>*>(base)[i];
  }
  Pack<scalar_t> out;
#pragma unroll
  for (int e = 0; e < N; ++e) out.v[e] = j0 + e < len ? base[(j0 + e) * stride] : fill;
  return out;
}

// Whether 16-byte accesses to a run at `p` (column stride `stride`) are possible.
template <typename scalar_t>
__device__ __forceinline__ bool vector_ok(const scalar_t* p, int64_t stride) {
  return stride == 1 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* base, int64_t i, int64_t len, bool vec,
                                           const Pack<scalar_t>& pk) {
  constexpr int N = Pack<scalar_t>::kSize;
  const int64_t j0 = i * N;
  if (vec && j0 + N <= len) {
    BATCHKL_CHECK_ALIGNED(base + j0);
    reinterpret_cast<Pack<scalar_t>*>(base)[i] = pk;
    return;
  }
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (j0 + e < len) base[j0 + e] = pk.v[e];
  }
}

// The gradient's stores in the 16-byte step loops, and the distillation
// kernel's loads there on its last read of a streamed row, carry an L2
// eviction policy (LaunchKnobs::reuse): evict-first on rows planned as
// streamed, so that the lines of a long row still to be read again stay in
// L2 instead, else evict-normal, which should act as a plain access. A
// policy in a register rather than an instruction per choice: the loops
// are the same code either way. Global memory only.
__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(BATCHKL_CUDA_EMULATOR)
  uint64_t first, normal;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(first));
  asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(normal));
  return evict_first ? first : normal;
#else
  (void)evict_first;
  return 0;
#endif
}

// Inputs do not change while the kernel runs: the load needs no ordering
// against the kernel's stores (the gradients are fresh tensors, never the
// inputs: kl_with_logits_fused_impl allocates them).
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_hinted(const Pack<scalar_t>* p, uint64_t policy) {
  static_assert(sizeof(Pack<scalar_t>) == 16, "a pack is one 16-byte access");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(BATCHKL_CUDA_EMULATOR)
  uint32_t w[4];
  asm("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
      : "l"(p), "l"(policy));
  Pack<scalar_t> out;
  std::memcpy(&out, w, sizeof out);
  return out;
#else
  (void)policy;
  return *p;
#endif
}

template <typename scalar_t>
__device__ __forceinline__ void store_hinted(Pack<scalar_t>* p, const Pack<scalar_t>& pk, uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(BATCHKL_CUDA_EMULATOR)
  uint32_t w[4];
  std::memcpy(w, &pk, sizeof w);
  asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(p), "r"(w[0]), "r"(w[1]),
               "r"(w[2]), "r"(w[3]), "l"(policy)
               : "memory");
#else
  (void)policy;
  *p = pk;
#endif
}

// Everything a group knows about its row after sweep 1. Logits x, y with
// row maxes m_q, m_p and sums S_q, S_p of 2^((a - m) k2) (k2 = log2(e) / T):
// q = 2^((x - m_q) k2) / S_q and log q = (x - m_q) / T - ln S_q, and the same
// for p; d = ln(S_q / S_p), so that log p - log q = ((y - m_p) - (x - m_q)) /
// T + d. Every argument starts from x - m_q: exact at the max, and rounded
// relative to the distance from it, not to the size of the logit or of log
// S. (From y - x and the maxes' difference instead, the log-ratio was a
// difference of two values as large as the rows' offset: a teacher's row of
// padding at float's lowest value beside an ordinary student row gave the
// rounding of 3.4e38 at T = 1 and +inf at T = 0.5; rows of logits around 1e9
// apart lost every digit. That form took one subtraction less per element
// where a sweep needs only one of q and p, as sm_90's SASS shows: float32,
// 80-160 more FADD in the kernels of the two KLs, the same count in JSD's.)
// Probs: q = x *
// inv_sum_q, log q = log x - log_sum_q, and the same for p. The forward
// KL's lean sweep (RowWork::lean_step) takes q = 2^((x - m_q) k2 + off_q)
// with off_q = -log2 S_q instead (one fused multiply-add and the SFU, where
// the scaling by 1 / S_q costs a multiply more).
template <typename acc_t>
struct RowConsts {
  acc_t m_q, m_p, log_sum_q, log_sum_p, d;
  acc_t inv_sum_q, inv_sum_p;
  acc_t off_q, off_p;
};

// kDistill: the forward KL from logits with the student's gradient alone (or
// none), distillation's case: only the lean sweeps are compiled, which take
// few enough registers for three CTAs per SM (logits_kernel). The same for
// JSD and reverse KL from logits (BATCHKL_LOGITS_LEAN=3, LaunchKnobs::lean):
// their three general sweeps, the writing one for the student's gradient
// alone (or none), with the forward KL's evict-first last read of streamed
// rows.
// kAhead: a kDistill kernel on double-buffered rows (Grid::prefetch): a
// CTA's next row's slice comes by bulk copy into its other stage while it
// computes this one.
template <typename scalar_t, Divergence kDiv, bool kProbs, bool kDistill = false, bool kAhead = false>
struct RowWork {
  static_assert(!kDistill || !kProbs, "kDistill: from logits");
  static_assert(!kAhead || kDistill, "kAhead: a kDistill kernel's rows double-buffered");
  // The distillation kernel's two lean sweeps (the forward KL); JSD's and
  // reverse KL's take the three general ones.
  static constexpr bool kLeanOnly = kDistill && kDiv == Divergence::kForward;
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t>;
  using Ops = DeviceOps<acc_t>;
  using Term = LogitsTerm<kDiv, acc_t, Ops, kProbs>;
  static constexpr int N = P::kSize;

  const LogitsLaunch& p;
  const Grid& grid;
  acc_t inv_t, k2, scale;  // k2 = log2(e) / T
  JSDWeights<acc_t> w;
  bool want_gx, want_gy;

  __device__ __forceinline__ static scalar_t fill() {
    // Padding that is a probability of 0 either way (contributes nothing).
    return static_cast<scalar_t>(kProbs ? acc_t(0) : -std::numeric_limits<acc_t>::infinity());
  }

  // Sweep 1 bookkeeping of one pack of one distribution: the running max m
  // of the raw logits and s = sum of 2^((a - m) k2). A NaN, or a +inf
  // (through inf - inf), makes s NaN, which the row's total then shows.
  __device__ __forceinline__ void observe(const P& pk, acc_t& m, acc_t& s) const {
    acc_t a[N];
    unpack(pk, a);
    if constexpr (kProbs) {
#pragma unroll
      for (int e = 0; e < N; ++e) s += a[e];
    } else {
      acc_t pm = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
      for (int e = 0; e < N; ++e) pm = max_skip_nan(pm, a[e]);
      if (pm > m) {
        s *= exp2_fast((m - pm) * k2);  // 0 * 0 while m was -inf
        m = pm;
      }
      if (m != -std::numeric_limits<acc_t>::infinity()) {
#pragma unroll
        for (int e = 0; e < N; ++e) s += exp2_fast((a[e] - m) * k2);
      } else {
        // Nothing but NaN and -inf so far: the max skipped the NaN, so it
        // must reach s here.
#pragma unroll
        for (int e = 0; e < N; ++e) s = a[e] != a[e] ? a[e] : s;
      }
    }
  }

  __device__ __forceinline__ Term term(acc_t x, acc_t y, const RowConsts<acc_t>& k, acc_t& q, acc_t& pr) const {
    if constexpr (kProbs) {
      q = x * k.inv_sum_q;
      pr = y * k.inv_sum_p;
      return Term(Ops::log(x) - k.log_sum_q, q, Ops::log(y) - k.log_sum_p, pr, w);
    } else {
      const acc_t dx = x - k.m_q, dy = y - k.m_p;
      q = exp2_fast(dx * k2) * k.inv_sum_q;
      pr = exp2_fast(dy * k2) * k.inv_sum_p;
      if constexpr (kDiv == Divergence::kJSD) {
        return Term(fma_(dx, inv_t, -k.log_sum_q), q, fma_(dy, inv_t, -k.log_sum_p), pr, w);
      } else {
        return Term(fma_(dy - dx, inv_t, k.d), q, pr);
      }
    }
  }

  // The forward KL from logits, the student's gradient alone (or none):
  // distillation's case, and the one a second sweep finishes (the gradient's
  // row constant is -1 a priori). Per element, what `term` and `raw_grad`
  // compute, in about two thirds of the instructions (H100, 2026-11-26: the
  // two-sweep kernel issued 1.7 warp instructions per element and was bound
  // by issue, not memory): q and p take their normaliser in the exponent,
  // and the loss p (log p - log q) is a fused multiply-add whose zero-
  // probability rule is a clamp: where p = 0 because y = -inf, log p - log q
  // is -inf or NaN (both -inf), which the clamp turns into a finite value
  // that p = 0 then zeroes. The one case left, p = 0 from underflow where x
  // = -inf or x - m_q overflows (0 * +inf), makes the thread's sum NaN; the
  // caller then sums its packs again through `term` (exact_loss). The
  // gradient (q - p) * scale is the same expression as raw_grad's with its
  // row constant -1. (The log-ratio from x - m_q and y - m_p, as RowConsts
  // says, costs no instruction where the gradient takes x - m_q anyway, one
  // subtraction per element where the loss is all there is.)
  template <bool kGX>
  __device__ __forceinline__ void lean_step(const P& xp, const P& yp, const RowConsts<acc_t>& k, acc_t& loss,
                                            P& ox) const {
    acc_t xs[N], ys[N];
    unpack(xp, xs);
    unpack(yp, ys);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t dx = xs[e] - k.m_q, dy = ys[e] - k.m_p;
      const acc_t pr = exp2_fast(fma_(dy, k2, k.off_p));
      const acc_t lr = max_skip_nan(fma_(dy - dx, inv_t, k.d), -std::numeric_limits<acc_t>::max());
      loss = fma_(pr, lr, loss);
      if constexpr (kGX) {
        const acc_t q = exp2_fast(fma_(dx, k2, k.off_q));
        ox.v[e] = static_cast<scalar_t>((q - pr) * scale);
      }
    }
  }

  // JSD from logits (Grid::lean; always in its kDistill kernels): what
  // `term` and raw_grad compute, in base 2 and in about two thirds of the
  // instructions (sm_90 bfloat16: the general sweep's step loops took 24-32
  // instructions per element, three of them on the SFU, which JSD's staged
  // rows keep busy: eight per element over the three sweeps). log2 q and
  // log2 p are the exponents themselves, with the normalisers in them (one
  // fused multiply-add each, as lean_step's); log2 m from the mixture (one
  // SFU log2, floored as LogitsTerm's log m); the zero-probability rule a
  // clamp of log2 q - log2 m and log2 p - log2 m at kJsdFloor, which a
  // probability of 0 then zeroes (where q > 0 the difference is above
  // -1100 even in double). Sums per thread: a = sum p (log2 p - log2 m), b =
  // sum q (log2 q - log2 m), of which the loss ln2 (beta a + (1 - beta) b)
  // and the row totals of gq = (1 - beta) ln2 q (log2 q - log2 m) and gp
  // (jsd_sums). The gradients q ((1 - beta) ln2 (log2 q - log2 m) - cq) *
  // scale and likewise for p: `gxs`, `cqs` ((1 - beta) ln2 scale, cq scale)
  // and `gys`, `cps` (beta ln2 scale, cp scale), which `sweep` computes
  // once per sweep. (Where q =
  // 0 that is 0 times a finite number: the clamp keeps the product finite
  // for scales up to FLT_MAX / 4096; see times_prob for its sign.)
  static constexpr acc_t kJsdFloor = acc_t(-4096);

  // A gradient, prob times factor f, with the sign the general formula (and
  // the CPU kernel) gives a probability of 0: +0, where a product gives -0
  // for f < 0. The fused multiply-add adds +0 to the exact product: the same
  // value wherever prob > 0, at the cost of the multiply it replaces.
  __device__ __forceinline__ static acc_t times_prob(acc_t prob, acc_t f) { return fma_(prob, f, acc_t(0)); }
  // kKeepLog (LaunchKnobs::keep): `oy` takes each element's log2 q - log2 m
  // as a Kept, for jsd_kept_step.
  template <bool kGX, bool kGY, bool kKeepLog = false>
  __device__ __forceinline__ void jsd_step(const P& xp, const P& yp, const RowConsts<acc_t>& k, acc_t& a, acc_t& b,
                                           acc_t gxs, acc_t cqs, acc_t gys, acc_t cps, P& ox, P& oy) const {
    static_assert(!kKeepLog || !kGY, "the kept log-ratios take the target gradient's place");
    acc_t xs[N], ys[N];
    unpack(xp, xs);
    unpack(yp, ys);
    Pack<Kept> kept;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t lq = fma_(xs[e] - k.m_q, k2, k.off_q), lp = fma_(ys[e] - k.m_p, k2, k.off_p);
      const acc_t q = exp2_fast(lq), pr = exp2_fast(lp);
      const acc_t lm = log2_mixture(fma_(w.beta, pr, w.one_minus_beta * q));
      const acc_t dq = max_skip_nan(lq - lm, kJsdFloor), dp = max_skip_nan(lp - lm, kJsdFloor);
      a = fma_(pr, dp, a);
      b = fma_(q, dq, b);
      if constexpr (kGX) ox.v[e] = static_cast<scalar_t>(times_prob(q, fma_(dq, gxs, -cqs)));
      if constexpr (kGY) oy.v[e] = static_cast<scalar_t>(times_prob(pr, fma_(dp, gys, -cps)));
      if constexpr (kKeepLog) kept.v[e] = static_cast<Kept>(dq);
    }
    if constexpr (kKeepLog) std::memcpy(&oy, &kept, sizeof oy);
  }

  // `sweep`'s keep: none, the totals sweep's stores, the writing sweep's reads.
  static constexpr int kNoKeep = 0, kKeepOut = 1, kKeepIn = 2;

  // What a staged row's totals sweep keeps of log2 q - log2 m in the place
  // of a target logit (LaunchKnobs::keep): the value itself where the place
  // holds the accumulation type, else float16 (whose range holds all of it:
  // from the floor, -4096, up to -log2 of the mixture's floor FLT_MIN, 126).
  using Kept = std::conditional_t<std::is_same_v<scalar_t, acc_t>, acc_t, c10::Half>;
  static_assert(sizeof(Kept) == sizeof(scalar_t), "a kept value takes a target logit's place");
  // float16 rows keep nothing (LaunchKnobs::keep), and compile none of it.
  static constexpr bool kMayKeep = !std::is_same_v<scalar_t, c10::Half>;

  // jsd_step's student gradient from the log-ratios kept in `kp`: q from
  // the logit as there, one SFU operation per element where jsd_step takes
  // three. Where Kept is acc_t, the same expressions on the same values:
  // the same bits.
  __device__ __forceinline__ void jsd_kept_step(const P& xp, const P& kp, const RowConsts<acc_t>& k, acc_t gxs,
                                                acc_t cqs, P& ox) const {
    acc_t xs[N], dq[N];
    unpack(xp, xs);
    Pack<Kept> kept;
    std::memcpy(&kept, &kp, sizeof kept);
    unpack(kept, dq);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t q = exp2_fast(fma_(xs[e] - k.m_q, k2, k.off_q));
      ox.v[e] = static_cast<scalar_t>(times_prob(q, fma_(dq[e], gxs, -cqs)));
    }
  }

  // jsd_step's per-thread sums as `sweep`'s: the loss, the totals of gq and gp.
  __device__ __forceinline__ void jsd_sums(acc_t a, acc_t b, double (&sums)[3]) const {
    const acc_t ln2(kLn2);
    sums[0] = static_cast<double>(ln2 * fma_(w.beta, a, w.one_minus_beta * b));
    sums[1] = static_cast<double>(ln2 * (w.one_minus_beta * b));
    sums[2] = static_cast<double>(ln2 * (w.beta * a));
  }

  __device__ __forceinline__ acc_t raw_grad(acc_t g, acc_t pr, acc_t raw, acc_t c, acc_t inv_sum) const {
    return batchkl::raw_grad<kProbs, acc_t, Ops>(g, pr, raw, c, inv_sum, scale);
  }

  // Copies `len` elements (column stride `stride`) into the shared memory at
  // `region`, keeping the source's offset within 16 bytes, so that the bulk
  // moves in aligned 16-byte pieces whatever the row's alignment. Returns
  // where element 0 landed.
  __device__ __forceinline__ static const scalar_t* stage_copy(const scalar_t* src, int64_t stride, int64_t len,
                                                               unsigned char* region, int tid, int group) {
    if (stride != 1) {
      scalar_t* dst = reinterpret_cast<scalar_t*>(region);
      for (int64_t j = tid; j < len; j += group) dst[j] = src[j * stride];
      return dst;
    }
    const auto mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(src) % 16);
    scalar_t* dst = reinterpret_cast<scalar_t*>(region + mis);
    const int64_t head = std::min<int64_t>(len, (16 - mis) % 16 / static_cast<int64_t>(sizeof(scalar_t)));
    for (int64_t j = tid; j < head; j += group) dst[j] = src[j];
    const int64_t nvec = len > head ? (len - head) / N : 0;
    const P* from = reinterpret_cast<const P*>(src + head);
    P* to = reinterpret_cast<P*>(dst + head);
    for (int64_t i0 = tid; i0 < nvec; i0 += int64_t{group} * kUnroll) {
      P v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t{u} * group;
        if (i < nvec) {
          BATCHKL_CHECK_ALIGNED(from + i);
          v[u] = from[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t{u} * group;
        if (i < nvec) {
          BATCHKL_CHECK_ALIGNED(to + i);
          to[i] = v[u];
        }
      }
    }
    for (int64_t j = head + nvec * N + tid; j < len; j += group) dst[j] = src[j];
    return dst;
  }

  // A slice's partial last pack (from element `from` to `len`) into the
  // stage, at once: stage_async's, and beside the kAhead kernel's bulk
  // copies, which move whole packs only.
  __device__ __forceinline__ static void stage_tail(scalar_t* to_x, scalar_t* to_y, const scalar_t* x,
                                                    const scalar_t* y, int64_t from, int64_t len) {
#pragma unroll 1
    for (int64_t j = from; j < len; ++j) {
      to_x[j] = x[j];
      to_y[j] = y[j];
    }
  }

  // Stages a slice whose two rows are contiguous and 16-byte aligned with
  // asynchronous copies, each thread issuing the packs it reads in sweep 1,
  // in that order: one commit group per sweep-1 step (kUnroll packs of each
  // operand). A last, partial pack is copied element by element, at once,
  // by the thread that owns it. Sweep 1's step loop waits for the groups
  // (stage_groups of them) one at a time, its pack-at-a-time rest for all
  // that remain.
  __device__ __forceinline__ static void stage_async(const scalar_t* x, const scalar_t* y, scalar_t* to_x,
                                                    scalar_t* to_y, int64_t len, int tid, int group) {
    // 32-bit pack indices (a staged slice fits in shared memory), and the
    // partial pack after the loop: with 64-bit indices and the element-wise
    // copy inside it, each 16-byte copy cost about 12 instructions.
    const int whole = static_cast<int>(len / N), npacks = static_cast<int>((len + N - 1) / N);
    const P* const fx = reinterpret_cast<const P*>(x);
    const P* const fy = reinterpret_cast<const P*>(y);
    P* const tx = reinterpret_cast<P*>(to_x);
    P* const ty = reinterpret_cast<P*>(to_y);
    for (int i0 = tid; i0 < npacks; i0 += group * kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * group;
        if (i < whole) {
          BATCHKL_CHECK_ALIGNED(fx + i);
          BATCHKL_CHECK_ALIGNED(fy + i);
          cp_async_16(tx + i, fx + i);
          cp_async_16(ty + i, fy + i);
        }
      }
      cp_async_commit();
    }
    if (whole < npacks && tid == whole % group) stage_tail(to_x, to_y, x, y, int64_t{whole} * N, len);
  }

  // How many of `packs` packs thread `tid` of `group` owns (tid + j * group).
  __device__ __forceinline__ static int64_t packs_of(int64_t packs, int tid, int group) {
    return tid < packs ? (packs - 1 - tid) / group + 1 : 0;
  }

  // This thread's commit groups of a slice of `len` elements copied by
  // stage_async: one per sweep-1 step of its packs, the last one partial.
  __device__ __forceinline__ static int stage_groups(int64_t len, int tid, int group) {
    return static_cast<int>((packs_of((len + N - 1) / N, tid, group) + kUnroll - 1) / kUnroll);
  }

  // Operand k's (kInput or kTarget) row `r` from column c0.
  __device__ __forceinline__ const scalar_t* operand_row(int k, int64_t r, int64_t c0) const {
    return static_cast<const scalar_t*>(p.ptr[k]) + p.geo.row_offset(k, r) + c0 * p.geo.col_stride[k];
  }

  // Whether row `r`'s slice (from column c0, `len` long) comes into a stage
  // by bulk copy in the kAhead kernel: a row the mask keeps, contiguous and
  // 16-byte aligned, with a whole pack at least. Every thread of the CTA
  // gets the same answer (each tracks the stages' mbarrier phases by it).
  __device__ __forceinline__ bool bulk_ok(int64_t r, int64_t c0, int64_t len) const {
    if (p.mask != nullptr && !p.mask[r]) return false;
    if (len < N || p.geo.col_stride[kInput] != 1 || p.geo.col_stride[kTarget] != 1) return false;
    return vector_ok(operand_row(kInput, r, c0), 1) && vector_ok(operand_row(kTarget, r, c0), 1);
  }

  // The bulk copies of row `r`'s whole packs into the stage at `stage`
  // (bulk_ok), completing on `bar`: one thread's work. The CTA's threads
  // last read that stage (and, keeping JSD's log-ratios, wrote it, each
  // thread then fencing its writes: see row()) before a barrier that the
  // issuing thread has passed.
  __device__ __forceinline__ void bulk_issue(int64_t r, int64_t c0, int64_t len, unsigned char* stage,
                                             uint64_t* bar) const {
    const auto bytes = static_cast<unsigned>(len / N * 16);
    fence_proxy_async();
    mbar_arrive_expect_tx(bar, 2 * bytes);
    bulk_copy(stage, operand_row(kInput, r, c0), bytes, bar);
    bulk_copy(stage + stage_bytes(grid.slice, sizeof(scalar_t)), operand_row(kTarget, r, c0), bytes, bar);
  }

  // One row, or one CTA's slice of it. `tid` / `group`: this thread's rank
  // in the group and the group's size (up to 32: lanes of one warp, reducing
  // with shuffles alone; kThreads: the CTA); `cluster`: CTAs per row. Returns the row's
  // loss, the same in every thread of the group, or where `share` comes back
  // true, this CTA's share of it in thread 0 alone (the caller adds the
  // cluster's shares up). `bulk`: in the kAhead kernel, the mbarrier on
  // which this row's whole packs land in `stage` (bulk_issue), with the
  // parity of the phase they complete; null where they do not come so (the
  // row is staged here, or not at all).
  __device__ double row(int64_t r, int64_t c0, int64_t len, int tid, int group, int cluster, unsigned char* stage,
                        Slot* slots, bool& share, uint64_t* bulk = nullptr, unsigned parity = 0) const {
    share = false;
    const RowGeometry& g = p.geo;
    scalar_t* gx = want_gx ? static_cast<scalar_t*>(p.ptr[kGradInput]) + g.row_offset(kGradInput, r) + c0 : nullptr;
    scalar_t* gy = !kDistill && want_gy ? static_cast<scalar_t*>(p.ptr[kGradTarget]) + g.row_offset(kGradTarget, r) + c0
                                         : nullptr;
    const int64_t npacks = len > 0 ? (len + N - 1) / N : 0;
    // 16-byte accesses wherever this row's addresses allow them: a thread
    // sees the same values in the same order either way.
    const bool vgx = vector_ok(gx, 1), vgy = vector_ok(gy, 1);
    const auto fill_grads = [&](acc_t v) {
      P pk;
#pragma unroll
      for (int e = 0; e < N; ++e) pk.v[e] = static_cast<scalar_t>(v);
      for (int64_t i = tid; i < npacks; i += group) {
        if (gx) store_pack(gx, i, len, vgx, pk);
        if (gy) store_pack(gy, i, len, vgy, pk);
      }
    };
    if (p.mask != nullptr && !p.mask[r]) {
      // Excluded: 0 loss and 0 gradient whatever the row holds (and nothing
      // copied in: bulk_ok checks the mask).
      fill_grads(acc_t(0));
      return 0.0;
    }
    const int64_t sx = g.col_stride[kInput], sy = g.col_stride[kTarget];
    const scalar_t* x = operand_row(kInput, r, c0);
    const scalar_t* y = operand_row(kTarget, r, c0);
    // Every sweep reads the slice from global memory, or when it is staged,
    // from shared memory (a CTA's slice is read from global memory once).
    const scalar_t* rx = x;
    const scalar_t* ry = y;
    int64_t rsx = sx, rsy = sy;
    int async_groups = 0;  // stage_async's groups still to wait for, one per sweep-1 step
    unsigned char* const stage_y = stage != nullptr ? stage + stage_bytes(grid.slice, sizeof(scalar_t)) : nullptr;
    if (stage != nullptr) {
      if (kAhead && bulk != nullptr) {
        // The whole packs by bulk copy, issued a row ahead; a partial last
        // pack now, by the thread that reads it.
        const int64_t whole_packs = len / N;
        if (whole_packs * N < len && tid == whole_packs % group) {
          stage_tail(reinterpret_cast<scalar_t*>(stage), reinterpret_cast<scalar_t*>(stage_y), x, y,
                     whole_packs * N, len);
        }
        mbar_wait(bulk, parity);
        rx = reinterpret_cast<const scalar_t*>(stage);
        ry = reinterpret_cast<const scalar_t*>(stage_y);
      } else if (sx == 1 && sy == 1 && vector_ok(x, 1) && vector_ok(y, 1)) {
        stage_async(x, y, reinterpret_cast<scalar_t*>(stage), reinterpret_cast<scalar_t*>(stage_y), len, tid, group);
        rx = reinterpret_cast<const scalar_t*>(stage);
        ry = reinterpret_cast<const scalar_t*>(stage_y);
        async_groups = stage_groups(len, tid, group);
      } else {
        // Strided or misaligned rows: another thread may own a pack's
        // leading elements, hence the barrier. (Staging is for a CTA per
        // row only.)
        rx = stage_copy(x, sx, len, stage, tid, group);
        ry = stage_copy(y, sy, len, stage_y, tid, group);
        __syncthreads();
      }
      rsx = rsy = 1;
    }
    const bool rvx = vector_ok(rx, rsx), rvy = vector_ok(ry, rsy);

    // Each sweep runs in two loops over a thread's packs, in one order
    // whatever the layout: while every access is a whole, aligned 16-byte
    // pack and a step is full, with no per-pack checks; and the rest (whole
    // packs too few for a step, a partial last pack, or every pack of a
    // layout that allows no 16-byte accesses) through load_pack /
    // store_pack: after the steps, or before them in a backward sweep.
    const int64_t whole = len > 0 ? len / N : 0;

    // Sweep 1.
    acc_t m[2] = {-std::numeric_limits<acc_t>::infinity(), -std::numeric_limits<acc_t>::infinity()};
    acc_t s[2] = {0, 0};
    int64_t i0 = tid;
    if (rvx && rvy) {
      const P* const vx = reinterpret_cast<const P*>(rx);
      const P* const vy = reinterpret_cast<const P*>(ry);
      for (; i0 + int64_t{kUnroll - 1} * group < whole; i0 += int64_t{group} * kUnroll) {
        if (async_groups > 0) cp_async_wait(--async_groups);
        P xs[kUnroll], ys[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = i0 + int64_t{u} * group;
          BATCHKL_CHECK_ALIGNED(vx + i);
          BATCHKL_CHECK_ALIGNED(vy + i);
          xs[u] = vx[i];
          ys[u] = vy[i];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          observe(xs[u], m[0], s[0]);
          observe(ys[u], m[1], s[1]);
        }
      }
    }
    // The rest, a pack at a time, in the same order (each pair of running
    // statistics sees its own operand's packs in turn). Unrolled, with its
    // bounds checks and element-wise loads, this loop cost the whole kernel
    // registers: 27 of the 48 kernels spilled. What it reads was staged by
    // the last copies issued.
    if (async_groups > 0) cp_async_wait(0);
#pragma unroll 1
    for (; i0 < npacks; i0 += group) {
      observe(load_pack(rx, rsx, i0, len, rvx, fill()), m[0], s[0]);
      observe(load_pack(ry, rsy, i0, len, rvy, fill()), m[1], s[1]);
    }
    // The group's totals, combined in a fixed order: for logits the maxes
    // first, then every thread's sums rescaled to them once (so that no
    // merge needs an exp), then the sums; or, with grid.merge, both at once
    // (LseOp's merges rescale).
    const auto allreduce = [&](auto& v, auto op, int exchange) {
      if (group <= 32) {
        warp_allreduce(v, op, group);
      } else {
        cta_allreduce(v, op, slots + exchange * kSlotsPerExchange, cluster);
      }
    };
    double mx[2] = {0.0, 0.0};
    double tot[2] = {static_cast<double>(s[0]), static_cast<double>(s[1])};
    if constexpr (kProbs) {
      allreduce(tot, AddOp{}, 1);
    } else if (grid.merge) {
      double lse[4] = {static_cast<double>(m[0]), tot[0], static_cast<double>(m[1]), tot[1]};
      allreduce(lse, LseOp<acc_t>{k2}, 0);
      mx[0] = lse[0];
      tot[0] = lse[1];
      mx[1] = lse[2];
      tot[1] = lse[3];
    } else {
      mx[0] = static_cast<double>(m[0]);
      mx[1] = static_cast<double>(m[1]);
      allreduce(mx, MaxOp{}, 0);
#pragma unroll
      for (int d = 0; d < 2; ++d) {
        const acc_t top = static_cast<acc_t>(mx[d]);  // exact: the max of acc_t values
        tot[d] = static_cast<double>(m[d] == top ? s[d] : s[d] * exp2_fast((m[d] - top) * k2));
      }
      allreduce(tot, AddOp{}, 1);
    }
    if (!kProbs && (tot[0] != tot[0] || tot[1] != tot[1] || tot[0] == 0 || tot[1] == 0)) {
      // A +inf logit (or a NaN), or a row of -inf only (a sum of 0), leaves
      // no distribution: NaN for the row and its gradients, as PyTorch gives
      // (and as the CPU kernel gets from its NaN log-probabilities).
      fill_grads(std::numeric_limits<acc_t>::quiet_NaN());
      return std::numeric_limits<double>::quiet_NaN();
    }
    // The row constants, with the logs in acc_t arithmetic (float for all
    // but float64 inputs): a double log costs every thread hundreds of
    // instructions. d takes the log of the sums' ratio, so that it stays
    // exact to a few ulp of itself when the two rows are alike.
    RowConsts<acc_t> k{};
    // The general formula's constants; the distillation kernel's lean sweep
    // needs them only where a thread sums its packs again (see there).
    const auto general_consts = [&] {
      k.log_sum_q = log_(static_cast<acc_t>(tot[0]));
      k.log_sum_p = log_(static_cast<acc_t>(tot[1]));
      k.inv_sum_q = acc_t(1) / static_cast<acc_t>(tot[0]);
      k.inv_sum_p = acc_t(1) / static_cast<acc_t>(tot[1]);
    };
    // JSD's lean sweeps (jsd_step) need none of them: two logs and two
    // divisions per row and thread fewer, which short rows notice.
    const bool jsd_lean = kDiv == Divergence::kJSD && !kProbs && (kDistill || grid.lean);
    if constexpr (!kLeanOnly) {
      if (!jsd_lean) general_consts();
    }
    if constexpr (!kProbs) {
      k.m_q = static_cast<acc_t>(mx[0]);
      k.m_p = static_cast<acc_t>(mx[1]);
      k.d = log_(static_cast<acc_t>(tot[0] / tot[1]));
      k.off_q = -log2_(static_cast<acc_t>(tot[0]));
      k.off_p = -log2_(static_cast<acc_t>(tot[1]));
    }

    const bool third = !kLeanOnly && needs_row_totals(kDiv, want_gx, !kDistill && want_gy);
    const acc_t minus_one(-1);

    // One pass over the slice: sums the divergence (and when kTotals, the
    // row totals of gq and gp that a third sweep needs), and writes the
    // gradients that kGX / kGY select, given their row constants cq / cp.
    // Compile-time choices, so that a pass computes only those and keeps its
    // packs in registers (a run-time one spilled them).
    // `keep` (LaunchKnobs::keep, JSD's lean sweeps of a staged row): kKeepOut
    // the totals sweep leaves log2 q - log2 m in the target's place, kKeepIn
    // the writing sweep reads it there (jsd_kept_step).
    const auto sweep = [&](auto write_gx, auto write_gy, auto totals, auto lean, auto keep, acc_t cq, acc_t cp,
                           double(&sums)[3]) {
      constexpr bool kGX = decltype(write_gx)::value, kGY = decltype(write_gy)::value;
      constexpr bool kTotals = decltype(totals)::value;
      acc_t loss = 0, sum_gq = 0, sum_gp = 0;
      constexpr bool kLean = decltype(lean)::value && kDiv == Divergence::kForward && !kProbs && !kTotals && !kGY;
      constexpr bool kJsdLean = decltype(lean)::value && kDiv == Divergence::kJSD && !kProbs;
      constexpr int kKeep = decltype(keep)::value;
      static_assert(kKeep == kNoKeep || (kJsdLean && !kGY && (kKeep == kKeepOut ? kTotals && !kGX : kGX && !kTotals)),
                    "kept log-ratios: JSD's lean totals sweep, then its writing sweep of the student's gradient");
      // The staged slice's target place, written where kKeepOut (the row's
      // own shared memory, which `ry` only reads otherwise).
      [[maybe_unused]] scalar_t* const keep_y = const_cast<scalar_t*>(ry);
      // jsd_step's sums and gradient factors.
      acc_t jsd_a = 0, jsd_b = 0;
      const acc_t ln2_scale = acc_t(kLn2) * scale;
      const acc_t gxs = w.one_minus_beta * ln2_scale, cqs = cq * scale;
      const acc_t gys = w.beta * ln2_scale, cps = cp * scale;
      // On streamed rows sweep 2 runs backward, a third (the writing sweep
      // after the totals one) forward again. The writing sweep is the row's
      // last read (but for lean_step's rare NaN re-sum below).
      const bool backward = grid.backward && (kTotals || !third);
      const auto step = [&](const P xp, const P yp, P& ox, P& oy) {  // by value: one 16-byte load each
        if constexpr (kLean) {
          lean_step<kGX>(xp, yp, k, loss, ox);
          return;
        }
        if constexpr (kJsdLean) {
          if constexpr (kKeep == kKeepIn) {
            jsd_kept_step(xp, yp, k, gxs, cqs, ox);
          } else {
            jsd_step<kGX, kGY, kKeep == kKeepOut>(xp, yp, k, jsd_a, jsd_b, gxs, cqs, gys, cps, ox, oy);
          }
          return;
        }
        acc_t xs[N], ys[N];
        unpack(xp, xs);
        unpack(yp, ys);
#pragma unroll
        for (int e = 0; e < N; ++e) {
          acc_t q, pr;
          const Term t = term(xs[e], ys[e], k, q, pr);
          loss += t.loss;
          if constexpr (kTotals) {
            sum_gq += t.gq;
            sum_gp += t.gp;
          }
          if constexpr (kGX) ox.v[e] = static_cast<scalar_t>(raw_grad(t.gq, q, xs[e], cq, k.inv_sum_q));
          if constexpr (kGY) oy.v[e] = static_cast<scalar_t>(raw_grad(t.gp, pr, ys[e], cp, k.inv_sum_p));
        }
      };
      // A thread's packs are tid + j * group, j < n_all; the first n_whole
      // are whole packs, the first n_fast of them (a whole number of steps,
      // where the layout allows 16-byte accesses) go through the step loop.
      // Forward: the step loop, then the rest, in increasing j. Backward
      // (LaunchKnobs::reuse): the rest, then the step loop, in decreasing j.
      // Two packs per step, both loaded before either gradient is stored:
      // the compiler may not move a load above a store that could alias it,
      // and two loads in flight matter when the rows stream from global
      // memory (one pack per operand in flight per thread is 16 KB per SM
      // at two CTAs, below what HBM's latency asks for). JSD from logits
      // too since its mixture's log became one SFU log2: sm_90 bfloat16,
      // its step loops take as many instructions per element with two
      // packs as with one, with no local memory in them (its few spills are
      // once per row). JSD on probabilities keeps one: its log-space
      // mixture leaves no registers for a second pack.
      constexpr int kStep = kDiv != Divergence::kJSD || !kProbs ? 2 : 1;
      const int64_t n_all = packs_of(npacks, tid, group);
      const int64_t n_whole = packs_of(whole, tid, group);
      const bool fast = rvx && rvy && (!kGX || vgx) && (!kGY || vgy);
      const int64_t n_fast = fast ? n_whole / kStep * kStep : 0;
      const auto rest = [&](int64_t i) {
        P ox, oy;
        step(load_pack(rx, rsx, i, len, rvx, fill()), load_pack(ry, rsy, i, len, rvy, fill()), ox, oy);
        if constexpr (kGX) store_pack(gx, i, len, vgx, ox);
        if constexpr (kGY) store_pack(gy, i, len, vgy, oy);
        if constexpr (kKeep == kKeepOut) store_pack(keep_y, i, len, rvy, oy);
      };
      // Forward: the steps, then the rest; backward: the rest, then the
      // steps. One copy of each loop: with a copy of the rest loop either
      // side of the step loop, the general kernels (128 registers) kept
      // more of their values in local memory, in every sweep.
#pragma unroll 1
      for (int part = 0; part < 2; ++part) {
        if ((part == 0) == backward) {
          const int64_t dj = backward ? -1 : 1;
          int64_t j = backward ? n_all - 1 : n_fast;
          for (int64_t c = n_fast; c < n_all; ++c, j += dj) rest(tid + j * group);
          continue;
        }
        if (n_fast == 0) continue;
        const P* const vx = reinterpret_cast<const P*>(rx);
        const P* const vy = reinterpret_cast<const P*>(ry);
        P* const gx_packs = reinterpret_cast<P*>(gx);
        P* const gy_packs = reinterpret_cast<P*>(gy);
        const uint64_t policy = l2_policy(grid.evict_first);
        const auto put = [&](int64_t at, const P& ox, const P& oy) {
          if constexpr (kGX) {
            BATCHKL_CHECK_ALIGNED(gx_packs + at);
            store_hinted(gx_packs + at, ox, policy);
          }
          if constexpr (kGY) {
            BATCHKL_CHECK_ALIGNED(gy_packs + at);
            store_hinted(gy_packs + at, oy, policy);
          }
        };
        // From the first pack of the first step, `di` apart.
        const int64_t di = backward ? -int64_t{group} : int64_t{group};
        // Compile-time, so that the loop holds one kind of load: a run-time
        // choice inside it cost the staged loops about 85 instructions per
        // step (sm_90: both loads, and byte moves merging their results).
        const auto steps = [&](auto hinted) {
          int64_t i = tid + (backward ? n_fast - 1 : 0) * group;
          for (int64_t c = 0; c < n_fast; c += kStep, i += kStep * di) {
            P xs[kStep], ys[kStep];
#pragma unroll
            for (int u = 0; u < kStep; ++u) {
              BATCHKL_CHECK_ALIGNED(vx + i + u * di);
              BATCHKL_CHECK_ALIGNED(vy + i + u * di);
              if constexpr (decltype(hinted)::value) {
                xs[u] = load_hinted(vx + i + u * di, policy);
                ys[u] = load_hinted(vy + i + u * di, policy);
              } else {
                xs[u] = vx[i + u * di];
                ys[u] = vy[i + u * di];
              }
            }
#pragma unroll
            for (int u = 0; u < kStep; ++u) {
              P ox, oy;
              step(xs[u], ys[u], ox, oy);
              put(i + u * di, ox, oy);
              if constexpr (kKeep == kKeepOut) {
                BATCHKL_CHECK_ALIGNED(keep_y + (i + u * di) * N);
                reinterpret_cast<P*>(keep_y)[i + u * di] = oy;
              }
            }
          }
        };
        // A staged slice is read from shared memory, which takes no policy.
        // The general kernels read with plain loads: a second step loop
        // cost them registers (their stores still take the policy).
        if constexpr (kDistill) {
          if (!kTotals && stage == nullptr) {  // the row's last read, streamed
            steps(std::true_type{});
            continue;
          }
        }
        steps(std::false_type{});
      }
      if constexpr (kLean) {
        if (loss != loss) {
          // lean_step's one NaN that is not the row's (see there): this
          // thread's packs again, their loss through `term`.
          if constexpr (kLeanOnly) general_consts();
          loss = 0;
          for (int64_t j = tid; j < npacks; j += group) {
            acc_t xs[N], ys[N];
            unpack(load_pack(rx, rsx, j, len, rvx, fill()), xs);
            unpack(load_pack(ry, rsy, j, len, rvy, fill()), ys);
#pragma unroll 1
            for (int e = 0; e < N; ++e) {
              acc_t q, pr;
              loss += term(xs[e], ys[e], k, q, pr).loss;
            }
          }
        }
      }
      if constexpr (kJsdLean) {
        jsd_sums(jsd_a, jsd_b, sums);
        return;
      }
      sums[0] = static_cast<double>(loss);
      sums[1] = static_cast<double>(sum_gq);
      sums[2] = static_cast<double>(sum_gp);
    };
    using On = std::true_type;
    using Off = std::false_type;
    using NoKeep = std::integral_constant<int, kNoKeep>;
    // The writing sweep needs no totals: with a third sweep, the second has them.
    // The lean sweep where one applies (the forward KL's writing sweep for
    // the student's gradient alone or none, every JSD sweep from logits), or
    // (BATCHKL_LOGITS_LEAN=0, for measuring it) the general one; a kDistill
    // kernel compiles its lean sweeps alone.
    const auto lean_or_not = [&](auto write_gx, auto write_gy, auto totals, acc_t cq, acc_t cp, double(&sums)[3]) {
      constexpr bool kHasLean =
          !kProbs && (kDiv == Divergence::kJSD ||
                      (kDiv == Divergence::kForward && !decltype(totals)::value && !decltype(write_gy)::value));
      if constexpr (!kHasLean) {
        return sweep(write_gx, write_gy, totals, Off{}, NoKeep{}, cq, cp, sums);
      } else {
        if constexpr (!kDistill) {
          if (!grid.lean) return sweep(write_gx, write_gy, totals, Off{}, NoKeep{}, cq, cp, sums);
        }
        return sweep(write_gx, write_gy, totals, On{}, NoKeep{}, cq, cp, sums);
      }
    };
    const auto writing_sweep = [&](acc_t cq, acc_t cp, double(&sums)[3]) {
      if constexpr (kDistill) {
        return gx != nullptr ? lean_or_not(On{}, Off{}, Off{}, cq, cp, sums)
                             : lean_or_not(Off{}, Off{}, Off{}, cq, cp, sums);
      }
      if (gx != nullptr && gy != nullptr) {
        lean_or_not(On{}, On{}, Off{}, cq, cp, sums);
      } else if (gx != nullptr) {
        lean_or_not(On{}, Off{}, Off{}, cq, cp, sums);
      } else if (gy != nullptr) {
        lean_or_not(Off{}, On{}, Off{}, cq, cp, sums);
      } else {
        lean_or_not(Off{}, Off{}, Off{}, cq, cp, sums);
      }
    };
    double sums[3];
    bool done = false;
    if constexpr (!kLeanOnly) {
      if (third) {
        if constexpr (kDiv == Divergence::kJSD && !kProbs && kMayKeep) {
          // JSD's staged rows where only the student's gradient is written
          // (LaunchKnobs::keep): the writing sweep from the log-ratios that
          // the totals sweep kept in the target's place. Each thread reads
          // there only what it wrote itself (its packs, the same in every
          // sweep), so no barrier is needed. In the kAhead kernel a bulk
          // copy (the async proxy) brings a later row into this stage after
          // the barrier that ends this row: each thread's proxy fence orders
          // its own writes before it, besides the issuing thread's.
          if (grid.keep && jsd_lean && stage != nullptr && gx != nullptr && gy == nullptr) {
            sweep(Off{}, Off{}, On{}, On{}, std::integral_constant<int, kKeepOut>{}, minus_one, minus_one, sums);
            allreduce(sums, AddOp{}, 2);
            double unused[3];
            sweep(On{}, Off{}, Off{}, On{}, std::integral_constant<int, kKeepIn>{}, static_cast<acc_t>(sums[1]),
                  minus_one, unused);
            if constexpr (kAhead) fence_proxy_async();
            BATCHKL_COUNT_KEPT_ROW();
            done = true;
          }
        }
        if (!done) {
          lean_or_not(Off{}, Off{}, On{}, minus_one, minus_one, sums);
          allreduce(sums, AddOp{}, 2);
          double unused[3];
          writing_sweep(kDiv == Divergence::kForward ? minus_one : static_cast<acc_t>(sums[1]),
                        kDiv == Divergence::kReverse ? minus_one : static_cast<acc_t>(sums[2]), unused);
          done = true;
        }
      }
    }
    if (!done) {
      writing_sweep(minus_one, minus_one, sums);
      double loss[1] = {sums[0]};
      if (group <= 32) {
        warp_allreduce(loss, AddOp{}, group);
      } else if (grid.share) {
        // Only the row's total is wanted, in one thread: no broadcast, and
        // across a cluster no barrier of its own (the kernel's last one
        // serves; see there).
        cta_reduce(loss, AddOp{}, slots + 2 * kSlotsPerExchange);
        share = true;
      } else {
        cta_allreduce(loss, AddOp{}, slots + 2 * kSlotsPerExchange, cluster);
      }
      sums[0] = loss[0];
    }
    return sums[0];
  }
};

// The number of rows the mask keeps (integer atomics: exact in any order).
// A template only because several files include this header (the launcher
// and each dtype's kernels): a plain __global__ function would be defined in
// every one of them.
template <typename = void>
__global__ void __launch_bounds__(kThreads) count_kept_kernel(const bool* __restrict__ mask, int64_t rows,
                                                              unsigned long long* __restrict__ kept) {
  unsigned long long c = 0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    c += mask[r] ? 1 : 0;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) c += __shfl_xor_sync(0xffffffffu, c, offset);
  if (threadIdx.x % 32 == 0 && c != 0) atomicAdd(kept, c);
}

// `row_loss`: one double per row (the per-row output itself for reduction
// 'none', else a workspace); `ticket`: zeroed; `kept`: the count_kept_kernel
// result when p.divide_by_kept_rows.
// Two CTAs per SM (128 registers a thread), three for the distillation
// kernels (kDistill, 80 registers; their staged 64 KB slices fit beside each
// other too).
template <typename scalar_t, Divergence kDiv, bool kProbs, bool kDistill = false, bool kAhead = false>
__global__ void __launch_bounds__(kThreads, kDistill ? 3 : 2)
    logits_kernel(const __grid_constant__ LogitsLaunch p, const __grid_constant__ Grid grid,
                  double* __restrict__ row_loss,
                  unsigned int* __restrict__ ticket, const unsigned long long* __restrict__ kept) {
  using Work = RowWork<scalar_t, kDiv, kProbs, kDistill, kAhead>;
  using acc_t = typename Work::acc_t;
  BATCHKL_DYNAMIC_SMEM(smem);
  double* const final_sum = reinterpret_cast<double*>(smem);
  bool* const last = reinterpret_cast<bool*>(smem + kThreads * sizeof(double));
  Slot* const slots = reinterpret_cast<Slot*>(smem + kFinalBytes);
  unsigned char* const stage = grid.stage ? smem + (kAhead ? kAheadFixedSmem : kFixedSmem) : nullptr;

  double divisor = p.divisor;
  if (p.num_items != nullptr) {
    divisor = *p.num_items;
  } else if (p.divide_by_kept_rows) {
    divisor *= static_cast<double>(*kept > 0 ? *kept : 1ull);
  }
  const double b = p.beta;
  const Work work{p,
                  grid,
                  static_cast<acc_t>(p.inv_temperature),
                  static_cast<acc_t>(p.inv_temperature * 1.4426950408889634),  // log2(e) / T
                  static_cast<acc_t>((kProbs ? 1.0 : p.inv_temperature) / (p.grad_scale_out ? 1.0 : divisor)),
                  JSDWeights<acc_t>{static_cast<acc_t>(b), static_cast<acc_t>(1.0 - b), static_cast<acc_t>(::log(b)),
                                    static_cast<acc_t>(::log1p(-b))},
                  p.ptr[kGradInput] != nullptr,
                  p.ptr[kGradTarget] != nullptr};
  const int64_t rows = p.geo.rows, cols = p.geo.cols;

  if (grid.warp_rows) {
    const int lanes = grid.lanes, rows_per_cta = kThreads / lanes;
    const int tid = static_cast<int>(threadIdx.x) & (lanes - 1);  // lanes: a power of two
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_cta + threadIdx.x / lanes; r < rows;
         r += static_cast<int64_t>(gridDim.x) * rows_per_cta) {
      bool share;
      const double loss = work.row(r, 0, cols, tid, lanes, 1, nullptr, nullptr, share);
      if (tid == 0) row_loss[r] = loss;
    }
  } else {
    const int cluster = grid.cluster;
    const unsigned rank = cluster > 1 ? cluster_rank() : 0;
    const int64_t c0 = static_cast<int64_t>(rank) * grid.slice;
    const int64_t len = std::min<int64_t>(grid.slice, cols - c0);
    // `bulk`, `parity`: Work::row's (the kAhead kernel's stage and mbarrier).
    const auto one_row = [&](int64_t r, unsigned char* row_stage, uint64_t* bulk, unsigned parity) {
      bool share;
      const double loss =
          work.row(r, c0, len, threadIdx.x, kThreads, cluster, row_stage, slots, share, bulk, parity);
      if (share && cluster > 1) {
        // Each CTA's share goes to rank 0's shared memory, which adds them up
        // in rank order after the barrier (what cta_allreduce would have
        // given, one barrier fewer). Peers then go on: in the kAhead kernel
        // rank 0 reads the shares before it reaches the next row's first
        // cluster barrier, and no peer writes its next share before that.
        double* const shares = reinterpret_cast<double*>(smem + kFinalBytes + kExchangeBytes);
        if (threadIdx.x == 0) *cluster_peer(shares + rank, 0) = loss;
        cluster_sync();
        if (rank == 0 && threadIdx.x == 0) {
          double total = shares[0];
          for (int k = 1; k < cluster; ++k) total += shares[k];
          row_loss[r] = total;
        }
      } else {
        if (rank == 0 && threadIdx.x == 0) row_loss[r] = loss;
        // No CTA may leave (and free its shared memory) while another of its
        // cluster still reads it. In the kAhead kernel, a CTA of its own
        // too: the next row's first exchange and its staging write what
        // other threads may still be reading (a NaN row's last exchange,
        // with BATCHKL_LOGITS_MERGE=1 its only one, has no barrier after
        // it; a row staged off 16 bytes shares packs), and the row after
        // it is copied into this row's stage.
        if (cluster > 1) {
          cluster_sync();
        } else if constexpr (kAhead) {
          __syncthreads();
        }
      }
    };
    if constexpr (kAhead) {
      // As many clusters as fit on the GPU at once (Grid::prefetch), each
      // taking every `clusters`-th row. A cluster's CTAs take the same rows,
      // so their cluster barriers pair up row by row. Row k of a CTA's
      // sequence is computed from stage k % 2; at its start thread 0 issues
      // the bulk copy of row k + 1 into the other stage, which row k - 1
      // read before the barrier that ended it.
      const int64_t clusters = static_cast<int64_t>(gridDim.x) / cluster;
      uint64_t* const bars = reinterpret_cast<uint64_t*>(smem + kAheadBarriers);
      const size_t stage_size = static_cast<size_t>(2 * stage_bytes(grid.slice, sizeof(scalar_t)));
      const auto issue = [&](int64_t r, int s) {
        if (threadIdx.x == 0 && r < rows && work.bulk_ok(r, c0, len)) {
          work.bulk_issue(r, c0, len, stage + s * stage_size, bars + s);
        }
      };
      if (threadIdx.x == 0) {
        mbar_init(bars, 1);
        mbar_init(bars + 1, 1);
      }
      __syncthreads();
      const int64_t first = static_cast<int64_t>(blockIdx.x) / cluster;
      issue(first, 0);
      unsigned parity = 0;  // bit s: the parity of the phase that stage s's next copy completes
      int s = 0;
      for (int64_t r = first; r < rows; r += clusters, s ^= 1) {
        issue(r + clusters, s ^ 1);
        const bool copied = work.bulk_ok(r, c0, len);
        one_row(r, stage + s * stage_size, copied ? bars + s : nullptr, parity >> s & 1u);
        if (copied) parity ^= 1u << s;
      }
    } else {
      one_row(static_cast<int64_t>(blockIdx.x) / cluster, stage, nullptr, 0);
    }
  }

  if (p.scalar_out == nullptr) return;
  // Last CTA in: every writer fences its row losses before its CTA takes a
  // ticket, so the CTA holding the last ticket sees all of them. The writers
  // alone: a fence waits for all of its thread's earlier stores, the
  // gradient's too, which the other threads need not wait for (Nsight
  // Compute, H200, bfloat16 8192x128256: of the 9.98 cycles the distillation
  // kernel's warps took per instruction, 0.71 waited on fences when every
  // thread took one). With a CTA per row the writer is thread 0, which takes
  // the ticket.
  if (grid.warp_rows && threadIdx.x != 0 && threadIdx.x % grid.lanes == 0) __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    *last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!*last) return;
  __threadfence();
  double acc = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) acc += __ldcg(row_loss + i);
  final_sum[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (static_cast<int>(threadIdx.x) < width) final_sum[threadIdx.x] += final_sum[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *p.scalar_out = final_sum[0] / divisor;
    if (p.grad_scale_out != nullptr) *p.grad_scale_out = static_cast<float>(1.0 / divisor);
  }
}

// The launcher (kl_logits_cuda.cu) gets its kernel through a host pointer
// from logits_kernel_for, defined for each dtype in a file of its own
// (kl_logits_kernel_<dtype>.cu): a parallel build then compiles the four
// dtypes' kernels side by side, where one file took minutes per GPU target.
using LogitsKernel = void (*)(LogitsLaunch, Grid, double*, unsigned int*, const unsigned long long*);

// Whether p is distillation's case, which the kDistill kernel serves.
inline bool distill_case(const LogitsLaunch& p) {
  return p.div == Divergence::kForward && !p.probs && !p.want_grad_target;
}

// The same for JSD (0 < beta < 1) and reverse KL (beta = 1) from logits,
// which kDistill kernels serve under BATCHKL_LOGITS_LEAN=3.
inline bool distill_three_sweep_case(const LogitsLaunch& p) {
  return p.div != Divergence::kForward && !p.probs && !p.want_grad_target;
}

// plan_grid's PlanFor for p under these knobs: the forward KL's
// distillation kernel has its own streaming rule (measured for it alone);
// JSD's and reverse KL's kDistill kernels keep the general kernel's plan
// (the same slices, three CTAs per SM where its shared memory allows) but
// where their rows are double-buffered.
inline PlanFor plan_for(const LaunchKnobs& knobs, const LogitsLaunch& p) {
  if (knobs.lean >= 2 && distill_case(p)) return PlanFor::kDistill;
  if (knobs.lean >= 3 && distill_three_sweep_case(p)) return PlanFor::kThreeSweep;
  return PlanFor::kGeneral;
}

// Whether p runs on a kDistill kernel under these knobs: the launcher's
// choice and the emulator's.
inline bool use_distill_kernel(const LaunchKnobs& knobs, const LogitsLaunch& p) {
  return plan_for(knobs, p) != PlanFor::kGeneral;
}

// The kernel for p's divergence and inputs (dispatch_logits, as every
// backend); `distill`: the kDistill kernel, where distill_case(p) or
// distill_three_sweep_case(p).
template <typename scalar_t>
LogitsKernel logits_kernel_of(const LogitsLaunch& p, bool distill, bool ahead = false) {
  if (distill && distill_case(p)) {
    return ahead ? logits_kernel<scalar_t, Divergence::kForward, false, true, true>
                 : logits_kernel<scalar_t, Divergence::kForward, false, true>;
  }
  if (distill && distill_three_sweep_case(p)) {
    if (p.div == Divergence::kJSD) {
      return ahead ? logits_kernel<scalar_t, Divergence::kJSD, false, true, true>
                   : logits_kernel<scalar_t, Divergence::kJSD, false, true>;
    }
    return ahead ? logits_kernel<scalar_t, Divergence::kReverse, false, true, true>
                 : logits_kernel<scalar_t, Divergence::kReverse, false, true>;
  }
  LogitsKernel kernel = nullptr;
  dispatch_logits(p, [&](auto div, auto probs) {
    kernel = logits_kernel<scalar_t, decltype(div)::value, decltype(probs)::value>;
  });
  return kernel;
}

// Selects the overload for a dtype; a tag and not a value of the type, which
// would convert (an at::Half to float) where an overload were missing.
template <typename scalar_t>
struct DtypeTag {};
LogitsKernel logits_kernel_for(DtypeTag<float>, const LogitsLaunch& p, bool distill, bool ahead);
LogitsKernel logits_kernel_for(DtypeTag<double>, const LogitsLaunch& p, bool distill, bool ahead);
LogitsKernel logits_kernel_for(DtypeTag<at::Half>, const LogitsLaunch& p, bool distill, bool ahead);
LogitsKernel logits_kernel_for(DtypeTag<at::BFloat16>, const LogitsLaunch& p, bool distill, bool ahead);

}  // namespace logits_cuda
}  // namespace batchkl
