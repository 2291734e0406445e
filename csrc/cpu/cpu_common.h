// Helpers shared by the CPU kernels of fastgan._C (csrc/cpu/<op>.cpp): what
// the backend's entries take (for csrc/checks.h), the activation dispatch
// (the activations themselves are csrc/activation.h), the dropout key/mask
// plumbing, and the column partition used by every pass.
//
// Numerics follow fastgan/impl/reference.py: epilogue math in `acc_t`
// (at::opmath_type: float for fp32/bf16/fp16, double for fp64), column
// reductions accumulated in double so their only error is the final rounding.
// The extension is built with -ffp-contract=off so `a * b + c` rounds twice,
// as the eager PyTorch reference does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>

#include "activation.h"
#include "checks.h"
#include "philox.h"

namespace fastgan {
namespace cpu {

// Tensors on the CPU; float64 kernels too (gradcheck runs through them).
constexpr Backend kBackend{"cpu", c10::DeviceType::CPU, /*float64=*/true};

// ------------------------------------------------------------------ activations
// The slope the derivative uses, in the accumulation dtype as the reference's
// act_grad keeps it: float(negative_slope) for fp32/bf16/fp16, the exact
// double for fp64 (fp64 is exact fp64, not fp64 with an fp32 slope).
template <typename T>
inline T grad_slope(double negative_slope) {
  return static_cast<T>(negative_slope);
}

// Calls f(std::integral_constant<int, code>{}) for the code `act`: a kernel
// instantiates its loop once per activation, activate() folds to that one
// case and the loop is branch-free and vectorizes. An unknown code runs as
// identity, as activate() treats it (codes are checked in Python).
template <int A = 0, typename F>
inline void dispatch_activation(int64_t act, const F& f) {
  if constexpr (A < kActivationCount) {
    if (act == A) return f(std::integral_constant<int, A>{});
    return dispatch_activation<A + 1>(act, f);
  } else {
    f(std::integral_constant<int, kIdentity>{});
  }
}

// ------------------------------------------------------------------ vectorization
// The elementwise tile loops are compiled once per x86-64
// ISA level and picked at load time (GCC/Clang target_clones, an ifunc): 16
// float lanes with AVX-512, 8 with AVX2, 4 on baseline SSE2. Each tile loop
// is a function of __restrict__ pointers and by-value scalars, so -O3 sees
// no aliasing and vectorizes it. The AVX-512 clone is x86-64-v4 (F, BW, VL,
// DQ, CD), not bare AVX-512F: packing fp32 lanes into bf16 needs AVX-512BW's
// 16-bit lane ops, and with F alone GCC leaves every bf16 loop scalar.
// The build's -fno-trapping-math (setup.py) is what lets the AVX2 and SSE
// clones turn a compare-and-select (leaky_relu, the dropout mask) into blends.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define FASTGAN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGAN_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTGAN_ISA_CLONES
#endif

// ------------------------------------------------------------------ dtype conversions
// widen<acc_t>(v) / narrow<scalar_t>(a): a tile loop's loads and stores between
// the storage dtype and the accumulation dtype. For bf16 they are spelled out
// branch-free, with exactly c10::BFloat16's rounding (to nearest even; any NaN
// becomes the quiet NaN 0x7FC0): c10's own conversion branches on NaN, and
// that one branch kept GCC from vectorizing every loop that stores bf16 (the
// bf16 epilogues ran one element at a time). fp16 and the rest use c10's.
template <typename acc_t, typename scalar_t>
inline acc_t widen(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
inline scalar_t narrow(acc_t a) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t u = std::bit_cast<uint32_t>(a);
    const uint32_t rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rne), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(a);
  }
}

// ------------------------------------------------------------------ transposes
// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols: a backward
// pass writes dz^T for its dW product with it, over the column slab it just
// computed (still in L2). oneDNN's linear reads only a contiguous input, so
// handed dz.t() it makes ATen copy it, and ATen's transposing copy ran at a
// tenth of a plain copy's speed (63 us for 128 x 1024 fp32, ~0.3 ms of a
// batch-64 seed-GAN step). 16 x 16 blocks keep both sides' lines in L1.
template <typename scalar_t>
FASTGAN_ISA_CLONES void transpose_block(const scalar_t* __restrict__ src, int64_t ld_src,
                                        scalar_t* __restrict__ dst, int64_t ld_dst,
                                        int64_t rows, int64_t cols) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kB) {
    const int64_t i1 = std::min(rows, i0 + kB);
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t j1 = std::min(cols, j0 + kB);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
}

// ------------------------------------------------------------------ vector math
// a[k] = tanh(a[k]) for k < n: torch.tanh's own vector tanh (MKL) where torch
// has it, tanhf elsewhere (csrc/cpu/vec_math.cpp).
void tanh_inplace(float* a, int64_t n);

// The end of a forward tile whose activation is tanh: t holds its n (<= kTile)
// pre-activations; y[j] = dropout(tanh(t[j])). The tanh runs over the whole
// tile at once (tanh_inplace), the rest as the other activations' tile loops.
template <bool kDrop, typename scalar_t>
inline void store_tanh_tile(float* __restrict__ t, int64_t n, const float* __restrict__ u,
                            float p, float scale, scalar_t* __restrict__ y) {
  tanh_inplace(t, n);
  for (int64_t j = 0; j < n; ++j) {
    float a = t[j];
    if constexpr (kDrop) a = u[j] >= p ? a * scale : 0.0f;
    y[j] = narrow<scalar_t>(a);
  }
}

// ------------------------------------------------------------------ dropout
// Uniforms u[k] = philox(seed, offset, idx0 + k) for k < n. Defined in
// dropout.cpp with AVX-512 / AVX2 intrinsics (16 or 8 counters at a time),
// picked at load time; this is the only Philox loop of the kernels.
void philox_uniform_row(const DropoutKey& key, uint32_t idx0, int64_t n, float* u);

// What a kernel needs to apply the mask of reference._apply_dropout:
// keep iff u >= float(p); kept values times float(1 / (1 - p)).
struct Dropout {
  bool on;
  float p;
  float scale;
  DropoutKey key;
  Dropout(double p_, const at::Tensor& seed, const at::Tensor& offset)
      : on(p_ != 0.0),
        p(static_cast<float>(p_)),
        scale(dropout_scale(p_)),
        key(*seed.data_ptr<int64_t>(), *offset.data_ptr<int64_t>()) {}
};

// Row tiles: a pass over columns [c0, c1) of row i draws the uniforms of at
// most kTile elements at a time into a stack buffer, then consumes them.
constexpr int64_t kTile = 256;

// Grain of the column partition: a thread gets at least ~32K elements and
// 16 columns, so small layers run on one thread without OpenMP overhead.
inline int64_t column_grain(int64_t rows) {
  const int64_t g = (int64_t(1) << 15) / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(g, 16);
}

}  // namespace cpu
}  // namespace fastgan
