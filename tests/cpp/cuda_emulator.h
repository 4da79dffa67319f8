// Runs CUDA kernel code on the CPU, for machines without a GPU: every CUDA
// thread of a cluster (or of a CTA) is a fiber (a stack of its own) on the calling
// thread, and __syncthreads, the cluster barrier and the warp shuffles are
// barriers at which a fiber hands over to the next; an asynchronous copy
// (cp.async) lands at the wait that covers it, or in every other pair of
// clusters at once (the latest and the earliest a GPU may deliver it: a read
// too early, or of bytes a copy already issued overwrites, shows up in one
// of them); so does a bulk copy (cp.async.bulk), at the first wait on its
// mbarrier once the phase's arrivals are in, or at once. Clusters run one after
// another. Blind to what only hardware shows (speed, the weaker corners of
// the memory model, bank conflicts), but it executes the very indexing,
// reductions, synchronisation and distributed-shared-memory exchanges of a
// kernel, and a barrier that not every thread reaches is reported as a
// deadlock (on a GPU it would hang or corrupt).
//
// Include before the kernel's header; the kernel marks its dynamic shared
// memory, cluster rank, cluster barrier and peer mapping with hooks that
// resolve to batchkl_emu:: below when BATCHKL_CUDA_EMULATOR is defined.
#pragma once

#define BATCHKL_CUDA_EMULATOR 1

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace batchkl_emu {

struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

// A shuffle's lanes meet at the barrier of its mask: the lanes it names,
// which are all that must reach it (a warp's other lanes may be elsewhere).
struct Warp {
  std::map<unsigned, Barrier> bars;  // by mask; map nodes stay put (a waiting fiber points at one)
  uint64_t slot[32] = {};
};

// A bulk copy (cp.async.bulk) not yet landed: the source's bytes, read at
// issue, and what its destination held then (a thread that writes there
// while the copy is in flight races with it).
struct BulkCopy {
  unsigned char* dst;
  std::vector<unsigned char> bytes, before;
};

// An mbarrier in shared memory (sm_90's transaction barrier), by its
// address: a phase completes when its `count` arrivals are in and the bytes
// announced by expect_tx have landed.
struct MBarrier {
  unsigned count = 0, pending = 0;  // arrivals a phase needs, and those still to come
  int64_t tx = 0;                   // bytes announced and not yet landed (a copy may land first)
  uint64_t phase = 0;               // phases completed
  std::vector<BulkCopy> copies;     // issued, landing at the first wait after the arrivals
  Barrier signal;                   // its generation moves at every change; waiters sleep on it
};

struct Cta {
  Barrier bar;
  std::vector<unsigned char> smem;
  std::vector<Warp> warps;
  std::map<const void*, MBarrier> mbarriers;  // map nodes stay put (a waiting fiber points at one's signal)
  unsigned live = 0;  // threads not yet finished
};

struct Cluster {
  Barrier bar;
  std::vector<std::unique_ptr<Cta>> ctas;
};

struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Cta* cta = nullptr;
  Cluster* cluster = nullptr;
  unsigned rank = 0;
};

// An asynchronous copy (cp.async) not yet landed in shared memory.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
  size_t n;
};

// A fiber's saved registers, and the switch between two fibers. glibc's
// swapcontext saves and restores the signal mask with a system call at every
// switch: over half of the emulated tests' time went there (perf, 2026-11-28).
// On x86-64 a switch here saves only what the SysV ABI has a callee keep (rbx,
// rbp, r12-r15, the SSE control/status and x87 control words) and the stack
// pointer; elsewhere it is ucontext's.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(BATCHKL_EMU_UCONTEXT)
extern "C" void batchkl_emu_switch(void** save_sp, void* load_sp);
// Weak: every translation unit that includes this header defines it.
asm(R"(
  .pushsection .text
  .weak batchkl_emu_switch
  .type batchkl_emu_switch, @function
  .p2align 4
batchkl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size batchkl_emu_switch, .-batchkl_emu_switch
  .popsection
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& save, Context& load) { batchkl_emu_switch(&save.sp, load.sp); }
// The first switch to a fresh stack pops zeros into the callee-saved
// registers, the caller's control words, and "returns" into entry with the
// stack as a call leaves it (16-byte aligned plus a return address: a 0, where
// a backtrace or an unwinder stops). entry must never return.
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int r = 0; r < 6; ++r) *--sp = 0;
  *--sp = uint64_t{mxcsr} | uint64_t{fpcw} << 32;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc{};
};
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  std::vector<AsyncCopy> open_copies;                 // issued since the last commit
  std::deque<std::vector<AsyncCopy>> copy_groups;  // committed, oldest first
  std::unique_ptr<char[]> stack;
  std::function<void()> body;
  ThreadState state;
  const Barrier* waiting = nullptr;
  uint64_t wait_generation = 0;
  bool done = false;
};

inline thread_local ThreadState tls;
inline thread_local Fiber* current = nullptr;
inline thread_local Context scheduler;
inline thread_local std::exception_ptr failure;

inline void arrive_and_wait(Barrier& b) {
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  current->waiting = &b;
  current->wait_generation = b.generation;
  switch_context(current->ctx, scheduler);
}

[[noreturn]] inline void fiber_main() {
  try {
    current->body();
    // The kernel waits for every copy it issues before reading it; one
    // still pending at exit is a slip in that bookkeeping.
    if (!current->open_copies.empty() || !current->copy_groups.empty()) {
      throw std::logic_error("a thread finished with cp.async copies it never waited for");
    }
  } catch (...) {
    if (!failure) failure = std::current_exception();
  }
  current->done = true;
  // Back to the scheduler for good: a fiber's entry never returns.
  switch_context(current->ctx, scheduler);
  __builtin_unreachable();
}

// Launches alternate between running the fibers in thread order and in
// reverse, so that a missing barrier between a writer and a reader shows up
// whichever of the two has the lower thread index.
inline thread_local unsigned launches = 0;
// Whether the cluster running lands its cp.async copies when they are
// issued (else at the wait that covers them): set by run().
inline thread_local bool copies_land_early = false;

// Runs the fibers until all are done; throws on a deadlock. When the last
// thread of a CTA finishes, its shared memory is overwritten with 0xff bytes
// (NaN): on a GPU it is gone, and a peer of the cluster still reading it
// would read garbage.
inline void run(std::vector<Fiber>& fibers) {
  copies_land_early = launches / 2 % 2 == 1;
  const bool reverse = launches++ % 2 == 1;
  const size_t n = fibers.size();
  for (;;) {
    bool progress = false, all_done = true;
    for (size_t k = 0; k < n; ++k) {
      Fiber& f = fibers[reverse ? n - 1 - k : k];
      if (f.done) continue;
      all_done = false;
      if (f.waiting != nullptr && f.waiting->generation == f.wait_generation) continue;
      f.waiting = nullptr;
      tls = f.state;
      current = &f;
      switch_context(scheduler, f.ctx);
      progress = true;
      if (f.done && --f.state.cta->live == 0) {
        std::fill(f.state.cta->smem.begin(), f.state.cta->smem.end(), static_cast<unsigned char>(0xff));
        // A copy still in flight would land in the shared memory of a CTA
        // that no longer has it (on a GPU: another CTA's).
        for (const auto& [at, b] : f.state.cta->mbarriers) {
          if (!b.copies.empty() || b.tx != 0 || b.pending != b.count) {
            if (!failure) {
              failure = std::make_exception_ptr(
                  std::logic_error("a CTA finished with an mbarrier phase begun and never completed (a bulk copy "
                                   "nobody waited for)"));
            }
          }
        }
      }
    }
    if (all_done) break;
    if (!progress) {
      if (failure) break;
      throw std::logic_error("emulated kernel deadlocked: a barrier (__syncthreads, cluster sync or shuffle) "
                             "that not every thread reaches, or an mbarrier phase whose arrivals or bytes never come");
    }
  }
  current = nullptr;
  if (failure) {
    auto e = failure;
    failure = nullptr;
    std::rethrow_exception(e);
  }
}

inline unsigned char* dynamic_smem() { return tls.cta->smem.data(); }
// Whether `n` bytes at `p` lie in this CTA's shared memory.
inline bool in_smem(const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  const auto& smem = tls.cta->smem;
  return b >= smem.data() && b + n <= smem.data() + smem.size();
}
inline void check_aligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) throw std::logic_error("misaligned 16-byte access");
}
// cp.async: the source is read when the copy is issued, and the bytes land
// in shared memory only when a wait covers the copy's group, the latest a
// GPU may deliver them (a read before that wait sees the 0xff filling, NaN,
// or what was there before), or, where copies_land_early, at once (a read
// of what the copy overwrites sees the new bytes).
// (.cg copies move 16 bytes, both addresses aligned to 16.)
inline void cp_async(void* dst, const void* src, size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  if (!in_smem(d, n)) {
    throw std::logic_error("cp_async: destination outside this CTA's shared memory");
  }
  if (n != 16) throw std::logic_error("cp_async: a .cg copy moves 16 bytes");
  check_aligned(dst);
  check_aligned(src);
  AsyncCopy c{d, {}, copies_land_early ? 0 : n};
  std::memcpy(copies_land_early ? d : c.bytes, src, n);
  current->open_copies.push_back(c);
}
inline void cp_async_commit() {
  current->copy_groups.push_back(std::move(current->open_copies));
  current->open_copies.clear();
}
// The groups a wait completes land newest first: nothing orders copies of
// two groups, so a stale copy still in flight to the same bytes may land
// last on a GPU.
inline void cp_async_wait(int pending) {
  auto& groups = current->copy_groups;
  std::vector<std::vector<AsyncCopy>> done;
  while (groups.size() > static_cast<size_t>(pending)) {
    done.push_back(std::move(groups.front()));
    groups.pop_front();
  }
  for (auto g = done.rbegin(); g != done.rend(); ++g) {
    for (const auto& c : *g) std::memcpy(c.dst, c.bytes, c.n);
  }
}

// mbarrier and bulk copies (sm_90). A barrier's state lives beside the CTA,
// by address; its own 8 bytes in shared memory hold a mark, checked at every
// use, so that a kernel that writes or copies over a barrier fails.
constexpr uint64_t kMBarrierMark = 0x4d42415252494552ull;  // "MBARRIER"
inline thread_local uint64_t bulk_copies = 0;  // issued since the process started (tests count them)
inline thread_local uint64_t kept_rows = 0;    // BATCHKL_COUNT_KEPT_ROW in the logits kernel (tests count them)
inline MBarrier& mbarrier_at(const void* p, bool fresh = false) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (!in_smem(b, 8) || reinterpret_cast<uintptr_t>(b) % 8 != 0) {
    throw std::logic_error("mbarrier: not an aligned 8-byte object in this CTA's shared memory");
  }
  auto it = tls.cta->mbarriers.find(p);
  if (fresh) {
    if (it != tls.cta->mbarriers.end()) throw std::logic_error("mbarrier: initialised twice");
    std::memcpy(const_cast<unsigned char*>(b), &kMBarrierMark, 8);
    return tls.cta->mbarriers[p];
  }
  if (it == tls.cta->mbarriers.end()) throw std::logic_error("mbarrier: used before mbarrier.init");
  if (std::memcmp(b, &kMBarrierMark, 8) != 0) throw std::logic_error("mbarrier: its 8 bytes were overwritten");
  return it->second;
}
inline void mbar_settle(MBarrier& b) {
  if (b.pending == 0 && b.copies.empty()) {
    if (b.tx < 0) throw std::logic_error("mbarrier: more bytes landed than expect_tx announced");
    if (b.tx == 0) {
      ++b.phase;
      b.pending = b.count;
    }
  }
  ++b.signal.generation;
}
inline void mbar_init(void* p, unsigned count) {
  if (count == 0) throw std::logic_error("mbarrier.init: a count of 0");
  MBarrier& b = mbarrier_at(p, true);
  b.count = b.pending = count;
}
inline void mbar_arrive_expect_tx(void* p, unsigned bytes) {
  MBarrier& b = mbarrier_at(p);
  if (b.pending == 0) throw std::logic_error("mbarrier: more arrivals than its count in one phase");
  b.tx += bytes;
  --b.pending;
  mbar_settle(b);
}
// cp.async.bulk from global to this CTA's shared memory, completing `bytes`
// on the mbarrier at `bar`. The source is read at issue; the bytes land at
// once where copies_land_early (a read of what they overwrite shows the new
// bytes), else at the first wait on the barrier after the phase's arrivals
// (a read before that wait shows what was there: 0xff, NaN, at first).
inline void bulk_copy(void* dst, const void* src, unsigned bytes, void* bar) {
  auto* d = static_cast<unsigned char*>(dst);
  if (!in_smem(d, bytes)) {
    throw std::logic_error("cp.async.bulk: destination outside this CTA's shared memory");
  }
  if (bytes == 0 || bytes % 16 != 0) throw std::logic_error("cp.async.bulk: a size that is not a positive multiple of 16");
  check_aligned(dst);
  check_aligned(src);
  MBarrier& b = mbarrier_at(bar);
  for (const auto& [at, other] : tls.cta->mbarriers) {
    const auto* m = static_cast<const unsigned char*>(at);
    if (m + 8 > d && m < d + bytes) throw std::logic_error("cp.async.bulk: a destination over an mbarrier");
  }
  ++bulk_copies;
  const auto* s = static_cast<const unsigned char*>(src);
  if (copies_land_early) {
    std::memcpy(d, s, bytes);
    b.tx -= bytes;
  } else {
    b.copies.push_back(BulkCopy{d, std::vector<unsigned char>(s, s + bytes), std::vector<unsigned char>(d, d + bytes)});
  }
  mbar_settle(b);
}
// mbarrier.try_wait.parity in a loop: returns once the phase of parity
// `parity` has completed (at first that is the phase before the first,
// which counts as completed: a wait for parity 1 returns at once).
inline void mbar_wait(void* p, unsigned parity) {
  for (;;) {
    MBarrier& b = mbarrier_at(p);
    if ((b.phase & 1u) != (parity & 1u)) return;
    if (b.pending == 0 && !b.copies.empty()) {
      for (const auto& c : b.copies) {
        if (std::memcmp(c.dst, c.before.data(), c.before.size()) != 0) {
          throw std::logic_error("cp.async.bulk: its destination written while the copy was in flight");
        }
        std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
        b.tx -= static_cast<int64_t>(c.bytes.size());
      }
      b.copies.clear();
      mbar_settle(b);
      continue;
    }
    current->waiting = &b.signal;
    current->wait_generation = b.signal.generation;
    switch_context(current->ctx, scheduler);
  }
}

inline unsigned cluster_rank() { return tls.rank; }
inline void cluster_sync() { arrive_and_wait(tls.cluster->bar); }

// The address in CTA `r`'s shared memory of what this CTA has at `p`.
template <typename T>
T* cluster_peer(T* p, unsigned r) {
  const auto* mine = tls.cta->smem.data();
  const auto offset = reinterpret_cast<const unsigned char*>(p) - mine;
  if (offset < 0 || static_cast<size_t>(offset) >= tls.cta->smem.size()) {
    throw std::logic_error("cluster_peer: pointer outside this CTA's shared memory");
  }
  if (r >= tls.cluster->ctas.size()) throw std::logic_error("cluster_peer: rank outside the cluster");
  return reinterpret_cast<T*>(tls.cluster->ctas[r]->smem.data() + offset);
}

// kernel<<<grid, block, smem>>>(args...) with clusters of `cluster` CTAs.
// Shared memory starts filled with 0xff bytes (NaN for floating types), so
// that a read of a slot nobody wrote shows up in the results.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned block, size_t smem, unsigned cluster, Kernel kernel, const Args&... args) {
  if (block % 32 != 0 || cluster == 0 || grid % cluster != 0) {
    throw std::invalid_argument("emulated launch: block must be whole warps and grid whole clusters");
  }
  constexpr size_t kStack = 256 * 1024;
  for (unsigned first = 0; first < grid; first += cluster) {
    Cluster cl;
    cl.bar.expected = cluster * block;
    for (unsigned c = 0; c < cluster; ++c) {
      auto cta = std::make_unique<Cta>();
      cta->bar.expected = block;
      cta->live = block;
      cta->smem.assign(smem, 0xff);
      cta->warps = std::vector<Warp>(block / 32);
      cl.ctas.push_back(std::move(cta));
    }
    std::vector<Fiber> fibers(static_cast<size_t>(cluster) * block);
    for (unsigned c = 0; c < cluster; ++c) {
      for (unsigned t = 0; t < block; ++t) {
        Fiber& f = fibers[static_cast<size_t>(c) * block + t];
        f.state = ThreadState{dim3(t), dim3(first + c), dim3(block), dim3(grid), cl.ctas[c].get(), &cl, c};
        f.body = [&] { kernel(args...); };
        f.stack.reset(new char[kStack]);
        make_context(f.ctx, f.stack.get(), kStack, fiber_main);
      }
    }
    run(fibers);
  }
}

}  // namespace batchkl_emu

#define threadIdx (::batchkl_emu::tls.thread_idx)
#define blockIdx (::batchkl_emu::tls.block_idx)
#define blockDim (::batchkl_emu::tls.block_dim)
#define gridDim (::batchkl_emu::tls.grid_dim)

inline void __syncthreads() { ::batchkl_emu::arrive_and_wait(::batchkl_emu::tls.cta->bar); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace batchkl_emu {
// A warp shuffle: every lane of `mask` publishes v, then reads lane
// src(lane)'s. A lane outside the mask, or a source outside it, is an error
// (undefined on a GPU).
template <typename T, typename Src>
T shuffle(unsigned mask, T v, Src src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  auto& warp = tls.cta->warps[tls.thread_idx.x / 32];
  const unsigned lane = tls.thread_idx.x % 32;
  const unsigned from = src(lane) % 32;
  if (!(mask >> lane & 1u) || !(mask >> from & 1u)) {
    throw std::logic_error("emulated shuffle: a lane, or the lane it reads, outside the mask");
  }
  auto [it, fresh] = warp.bars.try_emplace(mask);
  if (fresh) it->second.expected = static_cast<unsigned>(__builtin_popcount(mask));
  Barrier& bar = it->second;
  std::memcpy(&warp.slot[lane], &v, sizeof(T));
  arrive_and_wait(bar);
  T out;
  std::memcpy(&out, &warp.slot[from], sizeof(T));
  arrive_and_wait(bar);
  return out;
}
}  // namespace batchkl_emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  return ::batchkl_emu::shuffle(mask, v, [&](unsigned lane) { return lane ^ static_cast<unsigned>(offset); });
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  return ::batchkl_emu::shuffle(mask, v, [&](unsigned) { return static_cast<unsigned>(src_lane); });
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline float __expf(float v) { return std::exp(v); }
