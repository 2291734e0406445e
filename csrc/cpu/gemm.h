// The GEMMs of the CPU kernels: one entry per product, three paths chosen at
// run time per call (never at build time).
//
// * oneDNN, the copy bundled in torch, reached through its registered op
//   mkldnn::_linear_pointwise (the dispatcher: one library, one OpenMP
//   runtime). Its fp32 GEMM runs about 2x faster than ATen's on an AMD CPU
//   with AVX-512, where MKL (ATen's fp32 GEMM) uses only AVX2.
// * ATen (at::linear / at::mm: MKL, OpenBLAS, or oneDNN for bf16): where
//   oneDNN is absent, disabled, lacks the ISA for the dtype, or the product is
//   so small that oneDNN's fixed per-call cost (~15 us) exceeds the GEMM; and
//   fp32 on an Intel CPU, where MKL runs its AVX-512 kernels and is as fast.
// * widened: a bf16 / fp16 product on a CPU without native instructions for
//   it (no AVX512_BF16 / AMX / AVX512_FP16): both inputs converted to fp32,
//   the fp32 product (by the rule above), the output rounded once. There
//   ATen's bf16 GEMM is 6-10x slower than its fp32 one.
//
// fp32 stays IEEE fp32 on both paths: while a GEMM of ours runs, a reduced
// oneDNN fp32 math mode set by the user (torch.backends.mkldnn...
// fp32_precision = "bf16" / "tf32") is lifted to "ieee" and restored after.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastgan {
namespace cpu {
namespace gemm {

// Which path a call takes: kAuto decides by capability and size; kAten and
// kOnednn force a path (kOnednn still falls back to ATen for a dtype oneDNN
// cannot run on this CPU, e.g. fp64); kWiden widens every bf16 / fp16
// product (fp32 and fp64 as under kAuto).
enum Policy : int64_t { kAuto = 0, kAten = 1, kOnednn = 2, kWiden = 3 };

// The paths, in the order of cpu_gemm_info's counters.
enum Path : int64_t { kPathAten = 0, kPathOnednn = 1, kPathWidened = 2 };

// The path an (m, k) @ (k, n) product of dtype `dt` takes under the policy.
Path choose(at::ScalarType dt, int64_t m, int64_t k, int64_t n);

// x (M, K) @ w (N, K)^T (+ b): nn.Linear's product.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b);

// a (M, K) @ b (K, N), any strides (the backward products dz @ W, dz^T @ x).
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);

// Whether mm of an (m, k) @ (k, n) product of dtype dt reads `a` only
// contiguous (oneDNN's linear and the widened path copy any other `a`, through
// ATen's slow transposing copy), so that a kernel should hand it dz^T written
// by itself; ATen's BLAS takes the transposed view dz.t() as it is, for free.
bool needs_contiguous_a(at::ScalarType dt, int64_t m, int64_t k, int64_t n);

}  // namespace gemm
}  // namespace cpu
}  // namespace fastgan
