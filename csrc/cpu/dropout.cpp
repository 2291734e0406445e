// The Philox loop of the CPU kernels. It is the hottest scalar code of a
// dropout layer (10 rounds of two 32x32->64 multiplies per element), so it is
// compiled once per x86-64 ISA level and picked at load time (GCC/Clang
// target_clones): 16 lanes with AVX-512, 8 with AVX2, 4 on baseline SSE2.
// The loop has no dependence between elements, so -O3 vectorizes each clone.
#include "cpu_common.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGAN_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTGAN_ISA_CLONES
#endif

namespace fastgan {
namespace cpu {

FASTGAN_ISA_CLONES
static void philox_uniform_row_impl(uint32_t k0, uint32_t k1, uint32_t c1, uint32_t c2,
                                    uint32_t idx0, int64_t n, float* __restrict__ u) {
  for (int64_t k = 0; k < n; ++k) {
    u[k] = uint_to_uniform_float(philox_first_word(idx0 + static_cast<uint32_t>(k), c1, c2, k0, k1));
  }
}

void philox_uniform_row(const DropoutKey& key, uint32_t idx0, int64_t n, float* u) {
  philox_uniform_row_impl(key.k0, key.k1, key.c1, key.c2, idx0, n, u);
}

}  // namespace cpu
}  // namespace fastgan
