// How the process's C heap hands memory back to the OS (glibc malloc only):
//   fastgan_C::cpu_malloc_keep(int mmap_threshold, int trim_threshold) -> bool
//
// Why: a training step frees and re-allocates the same large tensors every
// step (gradients after zero_grad(set_to_none=True), GEMM outputs). With
// glibc's defaults, blocks over its mmap threshold are unmapped on free and
// a heap top over its trim threshold is returned to the OS, so each step
// faults the same pages in again: measured on a 2-vCPU VM, hundreds of
// page faults per seed-GAN step, each a few microseconds, and the dW GEMMs
// that write fresh 3 MB outputs ran at a fraction of their speed. Raising
// both thresholds keeps freed memory in the heap for the next step (what
// jemalloc / tcmalloc do by design). Process-wide, so it is opt-in from
// Python (fastgan.impl.cpu.keep_freed_memory), never a side effect of import.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace fastgan {
namespace cpu {
namespace {

bool cpu_malloc_keep(int64_t mmap_threshold, int64_t trim_threshold) {
  TORCH_CHECK(mmap_threshold > 0 && mmap_threshold <= (int64_t(1) << 30),
              "cpu_malloc_keep: mmap_threshold must be in (0, 2^30], got ", mmap_threshold);
  TORCH_CHECK(trim_threshold > 0 && trim_threshold <= (int64_t(1) << 40),
              "cpu_malloc_keep: trim_threshold must be in (0, 2^40], got ", trim_threshold);
#if defined(__GLIBC__)
  // mallopt returns 1 on success; glibc refuses an mmap threshold above its
  // maximum (32 MiB on 64-bit), which leaves the default in place.
  const bool mmap_ok = mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold)) == 1;
  const bool trim_ok = mallopt(M_TRIM_THRESHOLD, static_cast<int>(
                                   std::min<int64_t>(trim_threshold, INT32_MAX))) == 1;
  return mmap_ok && trim_ok;
#else
  (void)mmap_threshold;
  (void)trim_threshold;
  return false;  // another C library: nothing to tune here
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def("cpu_malloc_keep(int mmap_threshold, int trim_threshold) -> bool", &cpu_malloc_keep);
}

}  // namespace cpu
}  // namespace fastgan
