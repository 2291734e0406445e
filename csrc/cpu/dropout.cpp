// The Philox loop of the CPU kernels: the uniforms of a run of consecutive
// element indices. It is the costliest part of a dropout layer (10 rounds of
// two 32x32->64 bit multiplies per element, drawn in forward and again in
// backward), so on x86-64 it is written with AVX-512 / AVX2 intrinsics, 16 or
// 8 counters at a time, four such groups interleaved (0.70 against 1.14 ns
// an element on one Zen 5 core with AVX-512, 1.5 against 2.5 with AVX2),
// picked once at load time from what the CPU supports.
// Compilers auto-vectorize the scalar loop poorly (they widen every product
// to 64-bit lanes); here one vpmuludq on the even and one on the odd 32-bit
// lanes give both halves of all products, recombined with a blend.
// Bit-exact with philox_first_word / uint_to_uniform_float (csrc/philox.h).
#include <cstdlib>
#include <tuple>
#include <string>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "cpu_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTGAN_X86_SIMD 1
#endif

namespace fastgan {
namespace cpu {
namespace {

constexpr int kRounds = 10;

void philox_scalar(const DropoutKey& key, uint32_t idx0, int64_t n, float* __restrict__ u) {
  for (int64_t k = 0; k < n; ++k) u[k] = key.uniform(idx0 + static_cast<uint32_t>(k));
}

#ifdef FASTGAN_X86_SIMD
// uint_to_uniform_float on lanes: int32 x -> (x < 0 ? -x - 1 : x) == x ^ (x >> 31).

// One round of 16 counters (4 words in c0..c3); the round's key words k0, k1.
__attribute__((target("avx512f"), always_inline)) inline void philox_round512(
    __m512i& c0, __m512i& c1, __m512i& c2, __m512i& c3, __m512i ra, __m512i rb, __m512i k0,
    __m512i k1) {
  constexpr __mmask16 kOdd = 0xAAAA;
  const __m512i eb = _mm512_mul_epu32(c2, rb);                         // even lanes
  const __m512i ob = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), rb);  // odd lanes
  const __m512i ea = _mm512_mul_epu32(c0, ra);
  const __m512i oa = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), ra);
  const __m512i hi_b = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(eb, 32), ob);
  const __m512i hi_a = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(ea, 32), oa);
  const __m512i lo_b = _mm512_mask_blend_epi32(kOdd, eb, _mm512_slli_epi64(ob, 32));
  const __m512i lo_a = _mm512_mask_blend_epi32(kOdd, ea, _mm512_slli_epi64(oa, 32));
  c0 = _mm512_ternarylogic_epi32(hi_b, c1, k0, 0x96);  // three-way xor
  c2 = _mm512_ternarylogic_epi32(hi_a, c3, k1, 0x96);
  c1 = lo_b;
  c3 = lo_a;
}

// kV groups of 16 counters per iteration: a round is a chain of dependent
// multiplies (~7 cycles), so one group at a time leaves the multipliers idle
// most of the time; kV independent chains fill them.
__attribute__((target("avx512f"))) void philox_avx512(const DropoutKey& key, uint32_t idx0,
                                                      int64_t n, float* __restrict__ u) {
  constexpr int kV = 4;
  __m512i k0[kRounds], k1[kRounds];
  for (int r = 0; r < kRounds; ++r) {
    k0[r] = _mm512_set1_epi32(static_cast<int>(key.k0 + r * kPhiloxKeyA));
    k1[r] = _mm512_set1_epi32(static_cast<int>(key.k1 + r * kPhiloxKeyB));
  }
  const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 scale = _mm512_set1_ps(kUintToFloatScale);
  const __m512i w1 = _mm512_set1_epi32(static_cast<int>(key.c1));
  const __m512i w2 = _mm512_set1_epi32(static_cast<int>(key.c2));
  int64_t k = 0;
  for (; k + 16 * kV <= n; k += 16 * kV) {
    __m512i c0[kV], c1[kV], c2[kV], c3[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      c0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(idx0 + k + 16 * v)), lane);
      c1[v] = w1;
      c2[v] = w2;
      c3[v] = _mm512_setzero_si512();
    }
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) philox_round512(c0[v], c1[v], c2[v], c3[v], ra, rb, k0[r], k1[r]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      const __m512i x = _mm512_xor_si512(c0[v], _mm512_srai_epi32(c0[v], 31));
      _mm512_storeu_ps(u + k + 16 * v, _mm512_mul_ps(_mm512_cvtepi32_ps(x), scale));
    }
  }
  for (; k + 16 <= n; k += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(idx0 + k)), lane);
    __m512i c1 = w1, c2 = w2, c3 = _mm512_setzero_si512();
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) philox_round512(c0, c1, c2, c3, ra, rb, k0[r], k1[r]);
    const __m512i x = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));
    _mm512_storeu_ps(u + k, _mm512_mul_ps(_mm512_cvtepi32_ps(x), scale));
  }
  philox_scalar(key, idx0 + static_cast<uint32_t>(k), n - k, u + k);
}

__attribute__((target("avx2"), always_inline)) inline void philox_round256(
    __m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, __m256i ra, __m256i rb, __m256i k0,
    __m256i k1) {
  const __m256i eb = _mm256_mul_epu32(c2, rb);
  const __m256i ob = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), rb);
  const __m256i ea = _mm256_mul_epu32(c0, ra);
  const __m256i oa = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), ra);
  const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(eb, 32), ob, 0xAA);
  const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(ea, 32), oa, 0xAA);
  const __m256i lo_b = _mm256_blend_epi32(eb, _mm256_slli_epi64(ob, 32), 0xAA);
  const __m256i lo_a = _mm256_blend_epi32(ea, _mm256_slli_epi64(oa, 32), 0xAA);
  c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), k0);
  c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), k1);
  c1 = lo_b;
  c3 = lo_a;
}

// As philox_avx512, with groups of 8 (four interleaved: 1.5 against 2.5 ns an
// element on one Zen 5 core, despite some spilling of the 16 registers).
__attribute__((target("avx2"))) void philox_avx2(const DropoutKey& key, uint32_t idx0, int64_t n,
                                                 float* __restrict__ u) {
  constexpr int kV = 4;
  __m256i k0[kRounds], k1[kRounds];
  for (int r = 0; r < kRounds; ++r) {
    k0[r] = _mm256_set1_epi32(static_cast<int>(key.k0 + r * kPhiloxKeyA));
    k1[r] = _mm256_set1_epi32(static_cast<int>(key.k1 + r * kPhiloxKeyB));
  }
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 scale = _mm256_set1_ps(kUintToFloatScale);
  const __m256i w1 = _mm256_set1_epi32(static_cast<int>(key.c1));
  const __m256i w2 = _mm256_set1_epi32(static_cast<int>(key.c2));
  int64_t k = 0;
  for (; k + 8 * kV <= n; k += 8 * kV) {
    __m256i c0[kV], c1[kV], c2[kV], c3[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(idx0 + k + 8 * v)), lane);
      c1[v] = w1;
      c2[v] = w2;
      c3[v] = _mm256_setzero_si256();
    }
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) philox_round256(c0[v], c1[v], c2[v], c3[v], ra, rb, k0[r], k1[r]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      const __m256i x = _mm256_xor_si256(c0[v], _mm256_srai_epi32(c0[v], 31));
      _mm256_storeu_ps(u + k + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale));
    }
  }
  for (; k + 8 <= n; k += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(idx0 + k)), lane);
    __m256i c1 = w1, c2 = w2, c3 = _mm256_setzero_si256();
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) philox_round256(c0, c1, c2, c3, ra, rb, k0[r], k1[r]);
    const __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));
    _mm256_storeu_ps(u + k, _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale));
  }
  philox_scalar(key, idx0 + static_cast<uint32_t>(k), n - k, u + k);
}
#endif  // FASTGAN_X86_SIMD

using PhiloxFn = void (*)(const DropoutKey&, uint32_t, int64_t, float*);

// The widest path the CPU runs. FASTGAN_CPU_PHILOX=avx2|scalar picks a
// narrower one, so the tests can check every path bit for bit on one machine.
PhiloxFn pick_philox() {
  const char* env = std::getenv("FASTGAN_CPU_PHILOX");
  const std::string want = env ? env : "";
  if (want == "scalar") return philox_scalar;
#ifdef FASTGAN_X86_SIMD
  __builtin_cpu_init();
  if (want != "avx2" && __builtin_cpu_supports("avx512f")) return philox_avx512;
  if (__builtin_cpu_supports("avx2")) return philox_avx2;
#endif
  return philox_scalar;
}

const PhiloxFn philox_best = pick_philox();

}  // namespace

void philox_uniform_row(const DropoutKey& key, uint32_t idx0, int64_t n, float* u) {
  philox_best(key, idx0, n, u);
}

// The mask alone, for a fused layer that runs its plain children instead of
// the op (the speed rule, fastgan/nn/layers.py): keep[i, j] = scale where the
// fused epilogue keeps element i * cols + j of key (state[0], state[1]), else
// 0, in float32 (or in ``dtype`` where that holds the scale exactly); then
// state[1] += 1, the advance of the layer's stream that
// next_key makes. One call in place of a K = 1 linear_act on two columns of
// ones plus the key's clone and add: that cost more than nn.Dropout itself.
at::Tensor cpu_dropout_mask(const at::Tensor& state, int64_t rows, int64_t cols, double p,
                            at::ScalarType dtype) {
  FASTGAN_CHECK_DEVICE_TYPE(state, c10::DeviceType::CPU);
  FASTGAN_CHECK_DTYPE(state, at::kLong);
  FASTGAN_CHECK_SHAPE(state, 2);
  TORCH_CHECK(rows >= 0 && cols >= 0 && rows * cols < (int64_t(1) << 31),
              "rows * cols must be below 2**31 (32-bit element numbers), got ", rows, " x ", cols);
  TORCH_CHECK(p > 0.0 && p < 1.0, "p must be in (0, 1), got ", p);
  int64_t* s = state.data_ptr<int64_t>();
  const DropoutKey key(s[0], s[1]);
  s[1] += 1;
  const float pf = static_cast<float>(p), scale = dropout_scale(p);
  // A half-precision mask only where it holds the scale exactly (p = 0.2, 0.5,
  // ...): then y * keep in that dtype rounds float(y) * scale once, as fp32 does.
  at::ScalarType out = at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cpu_dropout_mask", [&] {
    if (static_cast<float>(static_cast<scalar_t>(scale)) == scale) out = dtype;
  });
  at::Tensor keep = at::empty({rows, cols}, state.options().dtype(out));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out, "cpu_dropout_mask", [&] {
    scalar_t* kp = keep.data_ptr<scalar_t>();
    const scalar_t kept = static_cast<scalar_t>(scale), dropped = static_cast<scalar_t>(0.0f);
    at::parallel_for(0, rows * cols, int64_t(1) << 15, [&](int64_t a, int64_t b) {
      float u[kTile];
      for (int64_t t0 = a; t0 < b; t0 += kTile) {
        const int64_t tw = std::min(kTile, b - t0);
        philox_uniform_row(key, static_cast<uint32_t>(t0), tw, u);
        for (int64_t k = 0; k < tw; ++k) kp[t0 + k] = u[k] >= pf ? kept : dropped;
      }
    });
  });
  return keep;
}

// The next key of a CPU dropout stream, for the fused layers' forward: returns
// (seed, offset) = (state[0], state[1]) as two new 0-dim tensors, as next_key's
// unbind gives them (autograd saves them for backward, so they must not alias
// the stream), then state[1] += 1, wrapping as ATen's int64 add_ does. One call
// where next_key's clone, add_ and unbind are three (~1 us less a layer).
std::tuple<at::Tensor, at::Tensor> cpu_next_key(const at::Tensor& state) {
  FASTGAN_CHECK_DEVICE_TYPE(state, c10::DeviceType::CPU);
  FASTGAN_CHECK_DTYPE(state, at::kLong);
  FASTGAN_CHECK_SHAPE(state, 2);
  TORCH_CHECK(state.is_contiguous(), "state must be contiguous");
  int64_t* s = state.data_ptr<int64_t>();
  at::Tensor seed = at::empty({}, state.options());
  at::Tensor offset = at::empty({}, state.options());
  *seed.data_ptr<int64_t>() = s[0];
  *offset.data_ptr<int64_t>() = s[1];
  s[1] = static_cast<int64_t>(static_cast<uint64_t>(s[1]) + 1u);
  return {seed, offset};
}

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def("cpu_dropout_mask(Tensor(a!) state, int rows, int cols, float p, ScalarType dtype) "
        "-> Tensor",
        &cpu_dropout_mask);
}

}  // namespace cpu
}  // namespace fastgan
