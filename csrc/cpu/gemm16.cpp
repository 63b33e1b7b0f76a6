// The 16-bit GEMM backend choice and the blocked mm (gemm16.h).
#include "cpu/gemm16.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "cpu/cpu_caps.h"
#include "cpu/gelu_rows.h"

namespace tfkernels::cpu {
namespace {

struct NativeDot16 {
  bool bf16, half;
};

NativeDot16 detect_native_dot16() {
  return {cpu_has("avx512_bf16") || cpu_has("amx_bf16"), cpu_has("avx512_fp16") || cpu_has("amx_fp16")};
}

// Output rows per task of mm_out_cpu's bf16 path: an fp32 block of kRows x N stays in L2 for
// N up to ~1000, and 2048-row problems still give every thread several tasks.
constexpr int64_t kRows = 128;

// A 2-D operand as gemm_rm takes it: data, leading dim, and whether it is stored
// transposed (column-major view of a row-major buffer).
template <typename T>
struct Operand {
  const T* data;
  int64_t ld;
  bool trans;
};

// `t` has a unit stride in one dim (mm_blas makes sure). A dim of size 1 may carry any
// stride, hence the max: BLAS wants a leading dim of at least the row length.
template <typename T>
Operand<T> operand(const at::Tensor& t) {
  if (t.stride(1) == 1) return {t.const_data_ptr<T>(), std::max(t.stride(0), t.size(1)), false};
  return {t.const_data_ptr<T>(), std::max(t.stride(1), t.size(0)), true};
}

template <typename T>
void mm_blas(at::Tensor& out, const at::Tensor& a_, const at::Tensor& b_) {
  const at::Tensor a = (a_.stride(1) == 1 || a_.stride(0) == 1) ? a_ : a_.contiguous();
  const at::Tensor b = (b_.stride(1) == 1 || b_.stride(0) == 1) ? b_ : b_.contiguous();
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const Operand<T> A = operand<T>(a), B = operand<T>(b);
  T* c = out.mutable_data_ptr<T>();
  at::parallel_for(0, ceil_div(m, kRows), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(kRows * n));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kRows, rows = std::min(kRows, m - r0);
      const T* a0 = A.trans ? A.data + r0 : A.data + r0 * A.ld;
      gemm_rm<T, float>(A.trans, B.trans, rows, n, k, 1.0f, a0, A.ld, B.data, B.ld, 0.0f, acc.data(), n);
      for (int64_t i = 0; i < rows; ++i) store_row(acc.data() + i * n, c + (r0 + i) * n, n);
    }
  });
}

}  // namespace

Gemm16 gemm16_backend(at::ScalarType dtype) {
  static const NativeDot16 native = detect_native_dot16();
  if (const char* env = std::getenv("TFKERNELS_CPU_GEMM16")) {
    const std::string choice(env);
    if (choice == "onednn") return Gemm16::kOneDnn;
    if (choice == "blas") return Gemm16::kBlas;
    TORCH_CHECK(choice.empty() || choice == "auto",
                "TFKERNELS_CPU_GEMM16 must be auto, onednn or blas, got \"", choice, "\"");
  }
  const bool fast = dtype == at::kBFloat16 ? native.bf16 : dtype == at::kHalf ? native.half : true;
  return fast ? Gemm16::kOneDnn : Gemm16::kBlas;
}

void mm_out_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = a.scalar_type();
  const bool is16 = dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!is16 || gemm16_backend(dtype) == Gemm16::kOneDnn || !out.is_contiguous() || a.numel() == 0 ||
      b.numel() == 0) {
    at::mm_out(out, a, b);
    return;
  }
  if (dtype == at::kBFloat16) {
    mm_blas<c10::BFloat16>(out, a, b);
  } else {
    // MKL has no fast half GEMM: widen each operand once (gemm_rm would widen B
    // again for every row block), one multithreaded sgemm, one rounding.
    out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  }
}

}  // namespace tfkernels::cpu
