// The CUDA emulator itself (tests/cpp/cuda_emulator.h): the kernel tests
// trust it to run every thread to the end, to hand values between lanes and
// CTAs, to land cp.async copies as late and as early as a GPU may, and to
// report a barrier not every thread reaches or an exception in a thread. Each of these is checked here on small kernels, so that a slip
// in its fibers (their context switch, stacks, scheduling) fails here by
// name rather than as wrong results in the kernel tests, or not at all.
#include "cuda_emulator.h"

#include <cfenv>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"

namespace {

using batchkl_test::check;
using batchkl_test::g_checks;
using batchkl_test::g_failures;

// A warp's and a CTA's sums of 1..n by shuffles and shared memory, and deep
// recursion on each fiber's own stack: every thread's result is checked.
void sums(float* warp_sums, double* cta_sums, int* depths) {
  const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = static_cast<float>(t + 1);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  auto* partial = reinterpret_cast<double*>(batchkl_emu::dynamic_smem());
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  double total = 0;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
  const unsigned g = blockIdx.x * blockDim.x + t;
  warp_sums[g] = v;
  cta_sums[g] = total;
  // Recursion the optimiser keeps (the volatile buffer): a few KiB of stack.
  auto deep = [](auto& self, int n) -> int {
    volatile char pad[64];
    pad[0] = static_cast<char>(n);
    return n == 0 ? pad[0] : 1 + self(self, n - 1);
  };
  depths[g] = deep(deep, 100 + static_cast<int>(t % 7));
}

void test_values() {
  constexpr unsigned kGrid = 3, kBlock = 128;
  std::vector<float> warp_sums(kGrid * kBlock, -1);
  std::vector<double> cta_sums(kGrid * kBlock, -1);
  std::vector<int> depths(kGrid * kBlock, -1);
  for (int launch = 0; launch < 4; ++launch) {  // in thread order and reversed, copies late and early
    batchkl_emu::launch(kGrid, kBlock, 4 * sizeof(double), 1, sums, warp_sums.data(), cta_sums.data(),
                        depths.data());
    bool warps = true, ctas = true, deep = true;
    for (unsigned g = 0; g < kGrid * kBlock; ++g) {
      const unsigned t = g % kBlock, first = t / 32 * 32 + 1, last = first + 31;
      warps &= warp_sums[g] == static_cast<float>((first + last) * 32 / 2);
      ctas &= cta_sums[g] == static_cast<double>(kBlock * (kBlock + 1) / 2);
      deep &= depths[g] == 100 + static_cast<int>(t % 7);
    }
    check(warps, "warp shuffle sums, launch " + std::to_string(launch));
    check(ctas, "CTA sums through shared memory, launch " + std::to_string(launch));
    check(deep, "recursion on the fibers' stacks, launch " + std::to_string(launch));
  }
}

// A cluster's CTAs read each other's shared memory after the cluster barrier.
void peers(int* out) {
  int* mine = reinterpret_cast<int*>(batchkl_emu::dynamic_smem());
  if (threadIdx.x == 0) *mine = static_cast<int>(blockIdx.x) * 10;
  batchkl_emu::cluster_sync();
  const unsigned n = gridDim.x, r = batchkl_emu::cluster_rank();
  out[blockIdx.x * blockDim.x + threadIdx.x] = *batchkl_emu::cluster_peer(mine, (r + 1) % n);
  batchkl_emu::cluster_sync();
}

void test_cluster() {
  std::vector<int> out(4 * 64, -1);
  batchkl_emu::launch(4, 64, 16, 4, peers, out.data());
  bool ok = true;
  for (unsigned g = 0; g < out.size(); ++g) ok &= out[g] == static_cast<int>((g / 64 + 1) % 4 * 10);
  check(ok, "cluster peers' shared memory");
}

// cp.async: what a thread reads of its copy's destination before the wait
// that covers it, and after.
void copy_then_read(const int* src, int* before, int* after) {
  unsigned char* dst = batchkl_emu::dynamic_smem() + 16 * threadIdx.x;
  batchkl_emu::cp_async(dst, src + 4 * threadIdx.x, 16);
  batchkl_emu::cp_async_commit();
  std::memcpy(&before[threadIdx.x], dst, sizeof(int));
  batchkl_emu::cp_async_wait(0);
  std::memcpy(&after[threadIdx.x], dst, sizeof(int));
}

// A read before the wait sees the shared memory's NaN filling (the copy
// lands as late as a GPU may deliver it) in every other pair of launches,
// and the copied bytes (as early as may be) in the others: a kernel that
// reads too early fails in one of them.
void test_copies() {
  alignas(16) static int src[4 * 64];
  for (int k = 0; k < 4 * 64; ++k) src[k] = 1000 + k;
  int early = 0, late = 0;
  for (int launch = 0; launch < 4; ++launch) {
    std::vector<int> before(64, 0), after(64, 0);
    batchkl_emu::launch(1, 64, 16 * 64, 1, copy_then_read, static_cast<const int*>(src), before.data(),
                        after.data());
    bool all_early = true, all_late = true, landed = true;
    for (int t = 0; t < 64; ++t) {
      all_early &= before[t] == src[4 * t];
      all_late &= before[t] == -1;  // 0xff bytes
      landed &= after[t] == src[4 * t];
    }
    early += all_early;
    late += all_late;
    check(landed, "cp.async bytes in shared memory after the wait, launch " + std::to_string(launch));
  }
  check(early == 2 && late == 2, "cp.async landing early in two launches of four and late in two (got " +
                                     std::to_string(early) + " and " + std::to_string(late) + ")");
}

// Bulk copies on an mbarrier: thread 0 initialises it and issues two
// copies of 512 bytes for each of two phases (parities 0 and 1, the second
// phase's bytes from src + 256 ints); every thread reads its 16 bytes after
// waiting, and thread 0 also between issuing and waiting: there it sees
// the copied bytes where they land at once, the 0xff filling where they
// land at the wait. A wait for the parity of the phase before the first
// returns at once, while no phase has completed.
void bulk_then_read(const int* src, int* before, int* after, int* second) {
  auto* smem = batchkl_emu::dynamic_smem();
  auto* bar = reinterpret_cast<uint64_t*>(smem + 1024);
  if (threadIdx.x == 0) {
    batchkl_emu::mbar_init(bar, 1);
    batchkl_emu::mbar_wait(bar, 1);  // before any phase completes (for the others, phase 0 may have)
  }
  __syncthreads();
  for (int phase = 0; phase < 2; ++phase) {
    if (threadIdx.x == 0) {
      batchkl_emu::mbar_arrive_expect_tx(bar, 1024);
      batchkl_emu::bulk_copy(smem, src + 256 * phase, 512, bar);
      batchkl_emu::bulk_copy(smem + 512, src + 256 * phase + 128, 512, bar);
    }
    int v;
    std::memcpy(&v, smem + 16 * threadIdx.x, sizeof v);
    if (phase == 0) before[threadIdx.x] = v;
    batchkl_emu::mbar_wait(bar, phase);
    std::memcpy(&v, smem + 16 * threadIdx.x, sizeof v);
    (phase == 0 ? after : second)[threadIdx.x] = v;
    __syncthreads();  // every read of this phase's bytes before the next copy
  }
}

void test_bulk_copies() {
  alignas(16) static int src[512];
  for (int k = 0; k < 512; ++k) src[k] = 5000 + k;
  int early = 0, late = 0;
  for (int launch = 0; launch < 4; ++launch) {
    std::vector<int> before(64, 0), after(64, 0), second(64, 0);
    batchkl_emu::launches = static_cast<unsigned>(launch);
    batchkl_emu::launch(1, 64, 1024 + 16, 1, bulk_then_read, static_cast<const int*>(src), before.data(),
                        after.data(), second.data());
    // Thread 0 reads its 16 bytes between issuing the copies and waiting.
    early += before[0] == src[0];
    late += before[0] == -1;  // 0xff bytes
    bool landed = true;
    for (int t = 0; t < 64; ++t) landed &= after[t] == src[4 * t] && second[t] == src[256 + 4 * t];
    check(landed, "bulk copies in shared memory after the wait, two phases, launch " + std::to_string(launch));
  }
  check(early == 2 && late == 2, "bulk copies landing at once in two launches of four and at the wait in two "
                                 "(got " + std::to_string(early) + " and " + std::to_string(late) + ")");
}

// An mbarrier phase whose bytes never come (announced, no copy), and a copy
// nobody waits for.
void bulk_never_lands(int*) {
  auto* bar = reinterpret_cast<uint64_t*>(batchkl_emu::dynamic_smem());
  if (threadIdx.x == 0) {
    batchkl_emu::mbar_init(bar, 1);
    batchkl_emu::mbar_arrive_expect_tx(bar, 16);
  }
  __syncthreads();
  batchkl_emu::mbar_wait(bar, 0);
}
void bulk_not_waited_for(int* src) {
  auto* smem = batchkl_emu::dynamic_smem();
  auto* bar = reinterpret_cast<uint64_t*>(smem + 16);
  if (threadIdx.x == 0) {
    batchkl_emu::mbar_init(bar, 1);
    batchkl_emu::mbar_arrive_expect_tx(bar, 16);
    batchkl_emu::bulk_copy(smem, src, 16, bar);
  }
}

// Half of a CTA at a __syncthreads the other half never reaches.
void half_at_barrier(int*) {
  if (threadIdx.x < 32) __syncthreads();
}

// One thread throws in the middle of a kernel whose others wait for it.
void throws(int*) {
  if (threadIdx.x == 5) throw std::runtime_error("thread 5");
  __syncthreads();
}

void test_errors() {
  int dummy = 0;
  std::string what;
  try {
    batchkl_emu::launch(1, 64, 0, 1, half_at_barrier, &dummy);
  } catch (const std::logic_error& e) {
    what = e.what();
  }
  check(what.find("deadlocked") != std::string::npos, "a barrier half the CTA reaches: deadlock reported (got '" +
                                                          what + "')");
  what.clear();
  try {
    batchkl_emu::launch(2, 64, 0, 1, throws, &dummy);
  } catch (const std::runtime_error& e) {
    what = e.what();
  }
  check(what == "thread 5", "an exception in one thread reaches the launch (got '" + what + "')");
  what.clear();
  try {
    batchkl_emu::launch(1, 64, 16, 1, bulk_never_lands, &dummy);
  } catch (const std::logic_error& e) {
    what = e.what();
  }
  check(what.find("deadlocked") != std::string::npos,
        "an mbarrier wait for bytes no copy brings: deadlock reported (got '" + what + "')");
  alignas(16) static int src[4] = {1, 2, 3, 4};
  for (unsigned launch : {0u, 2u}) {  // the copy landing late (never), and early (landed, its phase complete)
    what.clear();
    batchkl_emu::launches = launch;
    try {
      batchkl_emu::launch(1, 64, 32, 1, bulk_not_waited_for, static_cast<int*>(src));
    } catch (const std::logic_error& e) {
      what = e.what();
    }
    check(launch == 2 ? what.empty() : what.find("never completed") != std::string::npos,
          "a bulk copy nobody waits for, landing " + std::string(launch == 2 ? "early: complete" : "late: reported") +
              " (got '" + what + "')");
  }
  // The emulator is usable after both.
  test_values();
}

// Each fiber keeps its own floating-point control: the odd threads round
// upward, the even ones downward, and the caller's mode is its own again
// after the launch.
void rounding(float* out) {
  std::fesetround(threadIdx.x % 2 == 1 ? FE_UPWARD : FE_DOWNWARD);
  __syncthreads();
  volatile float one = 1.0f, three = 3.0f;
  out[threadIdx.x] = one / three;
  __syncthreads();
}

void test_rounding() {
  volatile float one = 1.0f, three = 3.0f;
  std::fesetround(FE_UPWARD);
  const float up = one / three;
  std::fesetround(FE_DOWNWARD);
  const float down = one / three;
  std::fesetround(FE_TONEAREST);
  check(up != down, "1/3 rounds differently upward and downward");
  std::vector<float> out(64);
  batchkl_emu::launch(1, 64, 0, 1, rounding, out.data());
  bool ok = true;
  for (unsigned t = 0; t < 64; ++t) ok &= out[t] == (t % 2 == 1 ? up : down);
  check(ok, "each thread's own rounding mode");
  check(std::fegetround() == FE_TONEAREST, "the caller's rounding mode after a launch");
}

}  // namespace

int main() {
  test_values();
  test_cluster();
  test_copies();
  test_bulk_copies();
  test_errors();
  test_rounding();
  std::printf("test_emulator: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
