// The two GEMM paths of csrc/cpu/gemm.h, the run-time choice between them,
// and what Python sees of it (fastgan.impl.cpu.gemm_info / set_gemm):
//   fastgan_C::cpu_gemm_set(int policy, int min_work) -> int[]  previous pair
//   fastgan_C::cpu_gemm_info() -> int[]  [policy, min_work, aten calls,
//       onednn calls, onednn usable for fp32, bf16, fp16]
// The per-path call counters let tests prove which path ran.
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <string_view>
#include <vector>

namespace fastgan {
namespace cpu {
namespace gemm {
namespace {

std::atomic<int64_t> g_policy{kAuto};
// Below M*K*N = 2^21 (e.g. 64 x 128 x 256) oneDNN's fixed cost per call is
// about the GEMM's own time at ATen's speed: ATen goes first there.
std::atomic<int64_t> g_min_work{int64_t(1) << 21};
std::atomic<int64_t> g_calls_aten{0}, g_calls_onednn{0};

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, std::string_view,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<std::string_view>);

// torch's own oneDNN linear, when this torch registers it.
const std::optional<c10::TypedOperatorHandle<LinearPointwise>>& linear_pointwise() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h.has_value() || !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return h->typed<LinearPointwise>();
  }();
  return op;
}

// The ISA oneDNN needs to beat ATen for each dtype: AVX-512 for fp32, native
// bf16 / fp16 instructions for those (without them oneDNN emulates, and ATen
// already reaches oneDNN itself for bf16).
bool isa_for(at::ScalarType dt) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512dq");
  static const bool bf16 =
      avx512 && (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"));
  static const bool fp16 = avx512 && __builtin_cpu_supports("avx512fp16");
  switch (dt) {
    case at::kFloat: return avx512;
    case at::kBFloat16: return bf16;
    case at::kHalf: return fp16;
    default: return false;  // oneDNN has no fp64 GEMM
  }
#else
  (void)dt;
  return false;
#endif
}

bool onednn_usable(at::ScalarType dt) {
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && isa_for(dt) &&
         linear_pointwise().has_value();
}

bool use_onednn(at::ScalarType dt, int64_t m, int64_t k, int64_t n) {
  const int64_t policy = g_policy.load(std::memory_order_relaxed);
  if (policy == kAten || !onednn_usable(dt)) return false;
  if (policy == kOnednn) return true;
  return m * k * n >= g_min_work.load(std::memory_order_relaxed);
}

// Lifts a reduced oneDNN fp32 matmul mode (bf16 / tf32) to IEEE for the
// duration of one of our fp32 GEMMs; both paths read it (ATen's fp32 mm goes
// to oneDNN under a reduced mode).
class StrictFp32 {
 public:
  explicit StrictFp32(at::ScalarType dt) {
    if (dt != at::kFloat) return;
    auto& ctx = at::globalContext();
    saved_ = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    if (saved_ == at::Float32Precision::BF16 || saved_ == at::Float32Precision::TF32) {
      ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
                              at::Float32Precision::IEEE);
      changed_ = true;
    }
  }
  ~StrictFp32() {
    if (changed_) {
      at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
                                              saved_);
    }
  }
  StrictFp32(const StrictFp32&) = delete;
  StrictFp32& operator=(const StrictFp32&) = delete;

 private:
  at::Float32Precision saved_ = at::Float32Precision::NONE;
  bool changed_ = false;
};

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& b) {
  g_calls_onednn.fetch_add(1, std::memory_order_relaxed);
  // The input must be contiguous (_linear_pointwise copies any other); the
  // weight may be a transposed view at no cost.
  return linear_pointwise()->call(x.contiguous(), w, b, "none",
                                  c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const StrictFp32 strict(x.scalar_type());
  if (use_onednn(x.scalar_type(), x.size(0), x.size(1), w.size(0))) return onednn_linear(x, w, b);
  g_calls_aten.fetch_add(1, std::memory_order_relaxed);
  return at::linear(x, w, b);
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const StrictFp32 strict(a.scalar_type());
  // a @ b = a @ (b^T)^T: oneDNN's linear with weight b^T, a view. Its input
  // must be contiguous (a transposed one is copied first, slowly in ATen:
  // 63 us for 128 x 1024 fp32, 1.5 ms for 512 x 1024 bf16), so the kernels'
  // dW products pass dz^T contiguous, written by their backward pass.
  if (use_onednn(a.scalar_type(), a.size(0), a.size(1), b.size(1))) {
    return onednn_linear(a, b.t(), std::nullopt);
  }
  g_calls_aten.fetch_add(1, std::memory_order_relaxed);
  return at::mm(a, b);
}

namespace {

std::vector<int64_t> cpu_gemm_info() {
  return {g_policy.load(), g_min_work.load(), g_calls_aten.load(), g_calls_onednn.load(),
          onednn_usable(at::kFloat), onednn_usable(at::kBFloat16), onednn_usable(at::kHalf)};
}

std::vector<int64_t> cpu_gemm_set(int64_t policy, int64_t min_work) {
  TORCH_CHECK(policy >= kAuto && policy <= kOnednn, "cpu_gemm_set: policy must be 0 (auto), ",
              "1 (aten) or 2 (onednn), got ", policy);
  TORCH_CHECK(min_work >= 0, "cpu_gemm_set: min_work must be >= 0, got ", min_work);
  return {g_policy.exchange(policy), g_min_work.exchange(min_work)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def("cpu_gemm_info() -> int[]", &cpu_gemm_info);
  m.def("cpu_gemm_set(int policy, int min_work) -> int[]", &cpu_gemm_set);
}

}  // namespace gemm
}  // namespace cpu
}  // namespace fastgan
