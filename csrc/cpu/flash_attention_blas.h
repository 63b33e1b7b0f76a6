// Row-major GEMM for the CPU flash-attention tiles, on the BLAS that libtorch_cpu
// links (MKL in the official wheels).
//
// Why not at::native::cpublas::gemm: its float/double/bf16 overloads are not
// exported from libtorch_cpu.so (no TORCH_API; `nm -D libtorch_cpu.so | grep
// cpublas4gemm` is empty in torch 2.14), so an extension that calls them fails to
// load with an undefined symbol. Only the header-inline template, which goes
// through gemm_stub (ATen's portable fallback kernel, ~10x slower than MKL), links.
// The Fortran BLAS entry points sgemm_/dgemm_ are exported, so we declare them
// weak and fall back to a plain loop when a torch build has no BLAS.
//
// Called inside at::parallel_for (an OpenMP region), MKL runs on the calling
// thread only, which is what the tiled kernels want.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace tfkernels::cpu {

// Fallback when no BLAS symbol resolved (or a size overflows int): correct, not fast.
template <typename T>
void gemm_rm_naive(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = trans_a ? a[p * lda + i] : a[i * lda + p];
        const T bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        acc += av * bv;
      }
      T& out = c[i * ldc + j];
      out = beta == T(0) ? alpha * acc : alpha * acc + beta * out;
    }
  }
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C. op(A) is A stored m x k
// (leading dim lda) or, with trans_a, A^T with A stored k x m; the same for B.
// beta == 0 ignores what C held (NaN included).
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm_rm: float or double");
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  constexpr int64_t kIntMax = 0x7fffffff;
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) <= kIntMax;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(std::max<int64_t>(ldb, 1)), ildb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    if (fits && sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
      return;
    }
  } else {
    if (fits && dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
      return;
    }
  }
  gemm_rm_naive<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace tfkernels::cpu
