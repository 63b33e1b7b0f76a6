// GEMM calls of the CPU kernels, in row-major terms, over the BLAS that torch
// links (MKL sgemm/dgemm, MKL's bf16 GEMM with fp32 accumulation; half operands
// are widened to fp32), fp32 on our own AVX-512 kernel where the CPU has it.
// Called inside at::parallel_for, a GEMM runs on the calling thread only, which is
// what the row-blocked kernels want: each thread owns a block of rows and keeps
// its GEMM result in cache for the epilogue.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/bf16_dot.h"
#include "cpu/f32_dot.h"

namespace tfkernels::cpu {

// The accumulation type: double for double, float for float, bf16 and half.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool is_16bit = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// The BLAS that ATen links (MKL in the x86-64 torch wheels) exports these from
// libtorch_cpu, but ATen's own cpublas::gemm overloads are not exported to
// extensions. Weak references resolve to them when present and to null when a
// build of torch has another (or no) BLAS; then gemm_rm falls back to at::addmm_.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's bf16 GEMM with fp32 accumulation and output (CBLAS enums are ints).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
}

namespace detail {

constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

inline bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > std::numeric_limits<int>::max()) return false;
  }
  return true;
}

// dst (rows x cols, contiguous) = src (rows x cols, leading dim ld) in fp32.
template <typename T>
void widen(const T* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    const T* in = src + i * ld;
    float* out = dst.data() + i * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<float>(in[j]);
  }
}

// Generic path: ATen's addmm on views of the buffers (16-bit operands upcast to fp32).
template <typename T, typename C>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_type<T> alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, acc_type<T> beta, C* c, int64_t ldc) {
  const auto in_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto out_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<C>::value);
  at::Tensor ta = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, in_opts).t()
                          : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, in_opts);
  at::Tensor tb = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, in_opts).t()
                          : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, in_opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, out_opts);
  tc.addmm_(ta.to(out_opts.dtype()), tb.to(out_opts.dtype()), beta, alpha);
}

// Whether a gemm_rm may run on our single-threaded tile kernels (f32_dot, bf16_dot):
// beta 0 or 1 (they overwrite or add), and the call is one task of a parallel region
// or torch runs one thread. A lone call elsewhere goes to the multithreaded sgemm, whose GEMV-like
// small products also sum with less error (a 1-row fused_mlp on our kernel came out
// at 2.4x an fp32 reference's error).
inline bool tile_kernel_runs_here(float beta) {
  return (beta == 0.0f || beta == 1.0f) && (at::in_parallel_region() || at::get_num_threads() == 1);
}

}  // namespace detail

// Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, where op(A) is
// A (stored m x k, leading dim lda) or, with trans_a, A^T (A stored k x m). Same for
// B. C is T (same as the inputs) or float for 16-bit inputs (fp32 accumulation and
// output). beta == 0 ignores what C held (NaN included). Inside at::parallel_for
// the BLAS runs on the calling thread only (MKL does not nest its threads).
template <typename T, typename C>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_type<T> alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, acc_type<T> beta, C* c, int64_t ldc) {
  static_assert((std::is_same_v<C, T> && !is_16bit<T>) || (is_16bit<T> && std::is_same_v<C, float>),
                "unsupported GEMM types");
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) {
      C* row = c + i * ldc;
      if (beta == acc_type<T>(0)) {
        std::fill(row, row + n, C(0));
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = C(acc_type<T>(row[j]) * beta);
      }
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    // fp32 on our AVX-512 kernel (f32_dot.h; not the AVX2 one, see
    // whole_gemms_available) where the CPU has it: MKL's sgemm reaches
    // ~62% of the FMA peak on the Zen 4 VM (138 of 226 GFLOP/s at 2048^3), the packed
    // kernel ~85%. It runs on the calling thread, so only where that is the intent:
    // inside a parallel region, or when torch uses one thread.
    if (detail::tile_kernel_runs_here(beta) && f32dot::whole_gemms_available()) {
      f32dot::gemm_packed(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc, beta == 1.0f);
      return;
    }
  }
  if (detail::fits_int({m, n, k, lda, ldb, ldc})) {
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, c10::Half>) {
      // MKL's f16 GEMM is emulated (and very slow) on CPUs without AVX512-FP16:
      // widen the operands to fp32 in thread-local buffers and use sgemm.
      if (&sgemm_ != nullptr) {
        thread_local std::vector<float> fa, fb;
        const int64_t ar = trans_a ? k : m, ac = trans_a ? m : k;
        const int64_t br = trans_b ? n : k, bc = trans_b ? k : n;
        detail::widen(a, ar, ac, lda, fa);
        detail::widen(b, br, bc, ldb, fb);
        gemm_rm<float, float>(trans_a, trans_b, m, n, k, alpha, fa.data(), ac, fb.data(), bc, beta, c, ldc);
        return;
      }
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      auto* fn = &cblas_gemm_bf16bf16f32;
      if (fn != nullptr) {
        using namespace detail;
        fn(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans, im, in, ik,
           alpha, reinterpret_cast<const uint16_t*>(a), ilda, reinterpret_cast<const uint16_t*>(b), ildb, beta, c,
           ildc);
        return;
      }
    } else {
      // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
      const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
      auto* fn = std::is_same_v<T, double> ? reinterpret_cast<void*>(&dgemm_) : reinterpret_cast<void*>(&sgemm_);
      if (fn != nullptr) {
        if constexpr (std::is_same_v<T, double>) {
          dgemm_(&ta, &tb, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
        } else {
          sgemm_(&ta, &tb, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
        }
        return;
      }
    }
  }
  detail::gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The operands of a 16-bit product a [m, k] @ b [k, n] as oneDNN should get them: for
// a row-major a whose k is not a multiple of 32, copies padded to the next multiple
// (zero columns of a, zero rows of b; the extra products are 0 x 0), else a and b as
// they are. oneDNN's AMX kernel (torch 2.14) reads the last 32-element block of such
// a row past its end (into the next row) against b's zero padding, so a NaN or Inf
// there made the row before NaN: torch.mm on 2 AMX Xeon cores from 32 rows on, for
// every odd k and many even ones (34, 38, 42, 68, ...), never for k a multiple of 32
// or a transposed a (which oneDNN copies itself). A padded view of a did not help
// (ATen copies it contiguous first). Known upstream (oneDNN issue 5717, fixed by pull
// request 5723: brgemm now copies every M tile's K tail into zeroed scratch); drop this
// once torch bundles a oneDNN with that fix. b keeps its layout: a weight passed as
// W^T is padded as W, so oneDNN still gets the transposed B that F.linear gives it and
// no copy transposes it.
inline std::pair<at::Tensor, at::Tensor> whole_blocks_reduction16(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kBlock = 32;
  const bool is16 = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  const int64_t k = a.size(1), padded = (k + kBlock - 1) / kBlock * kBlock;
  if (!is16 || k == padded || a.stride(1) != 1 || a.size(0) == 0 || b.size(1) == 0) return {a, b};
  at::Tensor a_pad = at::zeros({a.size(0), padded}, a.options());
  a_pad.narrow(1, 0, k).copy_(a);
  const bool b_transposed = b.stride(0) == 1 && b.stride(1) != 1;
  at::Tensor b_pad = b_transposed ? at::zeros({b.size(1), padded}, b.options()).t()
                                  : at::zeros({padded, b.size(1)}, b.options());
  b_pad.narrow(0, 0, k).copy_(b);
  return {a_pad, b_pad};
}

// c[rows, n] (leading dim ldc) = a[rows, k] @ b[n, k]^T (+ bias[n]), all of dtype T,
// through ATen (oneDNN for bf16/half: fp32 accumulation, bias added in fp32, one
// rounding, as eager F.linear). For tiles inside at::parallel_for, where oneDNN
// runs on the calling thread. `bias` is an undefined tensor or a detached [n] one.
template <typename T>
inline void linear_tile_aten(const T* a, int64_t rows, int64_t k, int64_t lda, const T* b, int64_t n, int64_t ldb,
                             const at::Tensor& bias, T* c, int64_t ldc) {
  if (rows <= 0 || n <= 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto [ta, tbt] = whole_blocks_reduction16(at::from_blob(const_cast<T*>(a), {rows, k}, {lda, 1}, opts),
                                                  at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t());
  at::Tensor tc = at::from_blob(c, {rows, n}, {ldc, 1}, opts);
  if (bias.defined()) {
    at::addmm_out(tc, bias, ta, tbt);
  } else {
    at::mm_out(tc, ta, tbt);
  }
}

// op(B) of a product whose tiles or row blocks run as many gemm_rm calls: fp32 on
// f32_dot's kernel, and a bf16 weight (op(B) = W^T, even k) on bf16_dot's where
// prepacked_applies, are packed once here (f32dot::PackedB) instead of once per call;
// everything else keeps the pointer and gemm_rm reads B itself.
template <typename T>
struct SharedB {
  bool trans;
  const T* data;
  int64_t ld;
  f32dot::PackedB packed;
  // op(B)[k0][c0] in the stored matrix.
  const T* at(int64_t k0, int64_t c0) const { return trans ? data + c0 * ld + k0 : data + k0 * ld + c0; }
};

// bf16: packed only when the caller runs its GEMMs on the tiles (bf16_tiles; see
// gemm16.h's forward_on_bf16_tiles), else gemm_rm's backend reads B.
template <typename T>
SharedB<T> share_b(bool trans_b, const T* b, int64_t ldb, int64_t k, int64_t n, bool bf16_tiles = false) {
  SharedB<T> shared{trans_b, b, ldb, {}};
  if constexpr (std::is_same_v<T, float>) {
    if (k > 0 && n > 0 && f32dot::whole_gemms_available()) shared.packed = f32dot::pack_b(trans_b, b, ldb, k, n);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_tiles && trans_b && n > 0 && ldb % 2 == 0 && bf16dot::prepacked_applies(k)) {
      shared.packed = bf16dot::pack_weight_transposed(b, ldb, k, n);
    }
  }
  return shared;
}

// gemm_rm(trans_a, b.trans, m, cols, depth, ..., op(B)[k0 : k0 + depth, c0 : c0 + cols], ...)
// on the shared B: op(A) is m x depth, its step 0 meeting op(B)'s step k0. Runs on the
// calling thread (call it from the tasks of a parallel region).
template <typename T, typename C>
inline void gemm_rm_shared(bool trans_a, int64_t m, int64_t cols, int64_t depth, acc_type<T> alpha, const T* a,
                           int64_t lda, const SharedB<T>& b, int64_t k0, int64_t c0, acc_type<T> beta, C* c,
                           int64_t ldc) {
  const bool prepacked = !b.packed.empty() && detail::tile_kernel_runs_here(beta) && m > 0 && cols > 0 && depth > 0;
  if constexpr (std::is_same_v<T, float>) {
    if (prepacked) {
      f32dot::gemm_prepacked(trans_a, m, cols, depth, alpha, a, lda, b.packed, k0, c0, c, ldc, beta == 1.0f);
      return;
    }
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, float>) {
    // Whole pairs only: a slice of the reduction that starts or ends inside a pair
    // goes to gemm_rm.
    if (prepacked && !trans_a && alpha == 1.0f && k0 % 2 == 0 && depth % 2 == 0) {
      bf16dot::gemm_prepacked(m, cols, depth / 2, a, lda, 2, b.packed, k0 / 2, c0, c, ldc, beta == 1.0f);
      return;
    }
  }
  gemm_rm<T, C>(trans_a, b.trans, m, cols, depth, alpha, a, lda, b.at(k0, c0), b.ld, beta, c, ldc);
}

// Split [0, n) into `parts` near-equal blocks of at most `max_block`; returns the block size.
inline int64_t balanced_block(int64_t n, int64_t max_block) {
  if (n <= 0) return 1;
  const int64_t parts = (n + max_block - 1) / max_block;
  return (n + parts - 1) / parts;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per task of a row-blocked kernel: blocks of at most max_rows, small enough that
// every thread gets one (near-equal blocks, see balanced_block).
inline int64_t rows_per_task(int64_t m, int64_t max_rows, int64_t threads) {
  return balanced_block(m, std::max<int64_t>(1, std::min(max_rows, ceil_div(m, threads))));
}

}  // namespace tfkernels::cpu
