// The two GEMM paths of csrc/cpu/gemm.h, the run-time choice between them,
// and what Python sees of it (fastgan.impl.cpu.gemm_info / set_gemm):
//   fastgan_C::cpu_gemm_set(int policy, int min_work) -> int[]  previous pair
//   fastgan_C::cpu_gemm_info() -> int[]  [policy, min_work, aten calls,
//       onednn calls, widened calls, onednn usable for fp32, bf16, fp16,
//       ATen's fp32 GEMM runs AVX-512 (so auto leaves fp32 to it), CPU vendor
//       (0 unknown / not x86, 1 Intel, 2 AMD: the speed rule's rows are per CPU kind)]
//   fastgan_C::cpu_gemm_path(ScalarType dtype, int m, int k, int n) -> int
//       the path (Path) a product of that size takes under the current policy
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
std::atomic<int64_t> g_calls_aten{0}, g_calls_onednn{0}, g_calls_widened{0};

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

// Whether ATen's own fp32 GEMM already runs AVX-512 kernels. It is MKL's (the
// x86 wheels), and MKL picks its AVX-512 kernels on Intel CPUs only: on an AMD
// CPU with AVX-512 (Zen 4, Zen 5) it runs its AVX2 ones at ~40% of the peak,
// where oneDNN's fp32 is ~2x faster. On an Intel Xeon (AVX-512, AMX) oneDNN's
// fp32 linear was 1.08-1.5x slower than MKL's at batch 64 and within 3% from
// batch 256, forward + backward of linear_act: there ATen goes first.
bool aten_fp32_is_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool intel_mkl =
      at::hasMKL() && __builtin_cpu_is("intel") && isa_for(at::kFloat);  // isa: AVX-512
  return intel_mkl;
#else
  return false;
#endif
}

// The CPU's vendor, as the speed rule (fastgan/nn/fuse/speed.py) tells CPU kinds
// apart: the same ISA runs at different relative speeds on Intel and AMD (MKL).
int64_t cpu_vendor() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_is("intel")) return 1;
  if (__builtin_cpu_is("amd")) return 2;
#endif
  return 0;
}

// oneDNN is the auto rule's pick for dt where it runs natively and ATen's GEMM
// is not as fast already. Under the "onednn" policy it runs wherever usable.
bool onednn_preferred(at::ScalarType dt) {
  return onednn_usable(dt) && !(dt == at::kFloat && aten_fp32_is_avx512());
}

bool reduced(at::ScalarType dt) { return dt == at::kBFloat16 || dt == at::kHalf; }

// The auto rule for fp32 and fp64, also the inner product of a widened call.
Path auto_path(at::ScalarType dt, int64_t m, int64_t k, int64_t n) {
  if (!onednn_preferred(dt)) return kPathAten;
  return m * k * n >= g_min_work.load(std::memory_order_relaxed) ? kPathOnednn : kPathAten;
}

}  // namespace

Path choose(at::ScalarType dt, int64_t m, int64_t k, int64_t n) {
  const int64_t policy = g_policy.load(std::memory_order_relaxed);
  if (policy == kAten) return kPathAten;
  if (policy == kOnednn) return onednn_usable(dt) ? kPathOnednn : kPathAten;
  // kAuto and kWiden: a bf16 / fp16 product that oneDNN cannot run natively
  // here (or every one, under kWiden) is computed in fp32.
  if (reduced(dt) && (policy == kWiden || !onednn_usable(dt))) return kPathWidened;
  return auto_path(dt, m, k, n);
}

namespace {

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

// The fp32 product of a widened call: inputs and output fp32, the auto rule's
// path, not counted (the widened counter has counted the call).
at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b) {
  if (auto_path(at::kFloat, x.size(0), x.size(1), w.size(0)) == kPathOnednn) {
    return linear_pointwise()->call(x.contiguous(), w, b, "none",
                                    c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  return at::linear(x, w, b);
}

// A bf16 / fp16 product in fp32: the products of two bf16 (or fp16) values
// are exact in fp32, so this is the fp32-accumulated GEMM that native bf16
// instructions compute, rounded once to the dtype (up to summation order).
// Without those instructions ATen's bf16 / fp16 GEMM ran at 5-17 GFLOP/s on
// an AVX2 CPU (Zen 3) whose fp32 GEMM reaches 100-120: 6-10x slower than
// converting both inputs and the output.
at::Tensor widened_linear(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b) {
  g_calls_widened.fetch_add(1, std::memory_order_relaxed);
  const StrictFp32 strict(at::kFloat);
  std::optional<at::Tensor> b32;
  if (b.has_value()) b32 = b->to(at::kFloat);
  return fp32_linear(x.to(at::kFloat), w.to(at::kFloat), b32).to(x.scalar_type());
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const StrictFp32 strict(x.scalar_type());
  switch (choose(x.scalar_type(), x.size(0), x.size(1), w.size(0))) {
    case kPathOnednn: return onednn_linear(x, w, b);
    case kPathWidened: return widened_linear(x, w, b);
    default:
      g_calls_aten.fetch_add(1, std::memory_order_relaxed);
      return at::linear(x, w, b);
  }
}

bool needs_contiguous_a(at::ScalarType dt, int64_t m, int64_t k, int64_t n) {
  return choose(dt, m, k, n) != kPathAten;
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const StrictFp32 strict(a.scalar_type());
  // a @ b = a @ (b^T)^T: oneDNN's linear with weight b^T, a view. Its input
  // must be contiguous (a transposed one is copied first, slowly in ATen:
  // 63 us for 128 x 1024 fp32, 1.5 ms for 512 x 1024 bf16), so the kernels'
  // dW products pass dz^T contiguous, written by their backward pass.
  switch (choose(a.scalar_type(), a.size(0), a.size(1), b.size(1))) {
    case kPathOnednn: return onednn_linear(a, b.t(), std::nullopt);
    case kPathWidened: return widened_linear(a, b.t(), std::nullopt);
    default:
      g_calls_aten.fetch_add(1, std::memory_order_relaxed);
      return at::mm(a, b);
  }
}

namespace {

std::vector<int64_t> cpu_gemm_info() {
  return {g_policy.load(),         g_min_work.load(),
          g_calls_aten.load(),      g_calls_onednn.load(),
          g_calls_widened.load(),   onednn_usable(at::kFloat),
          onednn_usable(at::kBFloat16), onednn_usable(at::kHalf),
          aten_fp32_is_avx512(),    cpu_vendor()};
}

std::vector<int64_t> cpu_gemm_set(int64_t policy, int64_t min_work) {
  TORCH_CHECK(policy >= kAuto && policy <= kWiden, "cpu_gemm_set: policy must be 0 (auto), ",
              "1 (aten), 2 (onednn) or 3 (widen), got ", policy);
  TORCH_CHECK(min_work >= 0, "cpu_gemm_set: min_work must be >= 0, got ", min_work);
  return {g_policy.exchange(policy), g_min_work.exchange(min_work)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def("cpu_gemm_info() -> int[]", &cpu_gemm_info);
  m.def("cpu_gemm_set(int policy, int min_work) -> int[]", &cpu_gemm_set);
  m.def("cpu_gemm_path(ScalarType dtype, int m, int k, int n) -> int",
        [](at::ScalarType dt, int64_t m, int64_t k, int64_t n) -> int64_t {
          return choose(dt, m, k, n);
        });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace fastgan
