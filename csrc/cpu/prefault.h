// Mapping fresh output memory ahead of a CPU kernel's first write.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace batchkl {

// A fresh multi-megabyte output (a gradient) is mapped lazily: each 4 KiB
// page faults when the kernel first writes it, which on a virtual machine
// costs about as much as the kernel's own work on that page. Asking for a
// thread's whole span in one system call (MADV_POPULATE_WRITE, Linux 5.14+)
// right before writing it is cheaper. A hint only: pages already mapped are
// left alone (the call never writes data, so a page shared with a
// neighbouring span is safe), spans under 64 KiB are not worth a system call,
// and after one failure (an older kernel) it is not tried again.
inline void populate_for_write(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  constexpr size_t kMinBytes = size_t{64} << 10;
  static std::atomic<bool> unsupported{false};
  if (data == nullptr || bytes < kMinBytes || unsupported.load(std::memory_order_relaxed)) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data) & ~(kPage - 1);  // madvise wants it page aligned
  const uintptr_t end = reinterpret_cast<uintptr_t>(data) + bytes;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE) != 0) {
    unsupported.store(true, std::memory_order_relaxed);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace batchkl
