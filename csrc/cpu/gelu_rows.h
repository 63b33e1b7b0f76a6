// Row-wise GELU loops shared by the CPU kernels of bias_gelu, linear_gelu and
// fused_mlp: the epilogue that turns a GEMM (or input) row into pre-activation
// and GELU output, and the backward pass dpre = grad * gelu'(pre) with the
// bias-gradient reduction fused in. float and 16-bit rows run fp32 math in
// vectorised, ISA-multiversioned loops (gelu_rows.cpp); double rows use the
// scalar definitions of csrc/gelu.h.
//
// Aliasing: an output may be the very buffer of an input (same element for
// element, e.g. GELU in place over a GEMM tile); partial overlaps are not allowed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "args.h"

namespace tfkernels::cpu {

// v = in[i] (+ bias[i]); pre[i] = v when pre is not null; out[i] = gelu(v).
// bias, when given, is in the accumulation type (float, or double for double).
void gelu_fwd(const float* in, const float* bias, float* pre, float* out, int64_t n, GeluApprox approx);
void gelu_fwd(const float* in, const float* bias, c10::BFloat16* pre, c10::BFloat16* out, int64_t n,
              GeluApprox approx);
void gelu_fwd(const float* in, const float* bias, c10::Half* pre, c10::Half* out, int64_t n, GeluApprox approx);
void gelu_fwd(const c10::BFloat16* in, const float* bias, c10::BFloat16* pre, c10::BFloat16* out, int64_t n,
              GeluApprox approx);
void gelu_fwd(const c10::Half* in, const float* bias, c10::Half* pre, c10::Half* out, int64_t n,
              GeluApprox approx);
void gelu_fwd(const double* in, const double* bias, double* pre, double* out, int64_t n, GeluApprox approx);

// v = pre[i] (+ bias[i]); d = grad[i] * gelu'(v); dpre[i] = d when dpre is not null;
// acc[i] += d when acc is not null (the bias gradient, in the accumulation type,
// from the unrounded d).
void gelu_bwd(const float* grad, const float* pre, const float* bias, float* dpre, float* acc, int64_t n,
              GeluApprox approx);
void gelu_bwd(const c10::BFloat16* grad, const c10::BFloat16* pre, const float* bias, c10::BFloat16* dpre,
              float* acc, int64_t n, GeluApprox approx);
void gelu_bwd(const c10::Half* grad, const c10::Half* pre, const float* bias, c10::Half* dpre, float* acc,
              int64_t n, GeluApprox approx);
void gelu_bwd(const float* grad, const c10::BFloat16* pre, const float* bias, c10::BFloat16* dpre, float* acc,
              int64_t n, GeluApprox approx);
void gelu_bwd(const float* grad, const c10::Half* pre, const float* bias, c10::Half* dpre, float* acc, int64_t n,
              GeluApprox approx);
void gelu_bwd(const double* grad, const double* pre, const double* bias, double* dpre, double* acc, int64_t n,
              GeluApprox approx);

// acc[j] += sum over `rows` rows (leading dim ld) of x[r, j], j < n, in row order.
template <typename T, typename Acc>
inline void add_rows(const T* x, int64_t rows, int64_t n, int64_t ld, Acc* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * ld;
    for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<Acc>(row[j]);
  }
}

// dst[j] = src[j] + bias[j] (src[j] when bias is null) in the output type, rounded
// once. The float versions are loops cloned per ISA (gelu_rows.cpp): compiled for the
// baseline ISA in a kernel's own file, the bf16 rounding stays scalar (fused_qkv's
// copies to the head layout took 1.6 of its 32 ms forward that way).
void round_row(const float* src, const float* bias, c10::BFloat16* dst, int64_t n);
void round_row(const float* src, const float* bias, c10::Half* dst, int64_t n);
void round_row(const float* src, const float* bias, float* dst, int64_t n);
inline void round_row(const double* src, const double* bias, double* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bias != nullptr ? src[j] + bias[j] : src[j];
}

// Converts n accumulated values to the output type.
template <typename T, typename Acc>
inline void store_row(const Acc* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<Acc, float>) {
    round_row(src, nullptr, dst, n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

// A bias (or none) as a contiguous tensor of the accumulation type of `dtype`
// (float for float and 16-bit, double for double); undefined when absent.
at::Tensor bias_in_acc_type(const c10::optional<at::Tensor>& bias, at::ScalarType dtype);

// Rows per chunk for the bias-gradient partial sums: fixed by the shape, not by
// the thread count, so reductions are deterministic run to run and across
// thread counts (each chunk sums its rows in order, chunks are reduced in order).
inline int64_t reduction_rows_per_chunk(int64_t rows, int64_t n) {
  const int64_t target = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(n, 1));
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(target, 16)));
}

// Adds the per-row contributions of rows [r0, r1) to total[0, n) (double): row_fn(r, acc)
// adds row r into acc (the accumulation type), which is flushed into total every
// kSumBlock rows. Short float sums then double sums keep the error near torch's
// cascade sum, in a fixed order.
constexpr int64_t kSumBlock = 16;

template <typename Acc, typename F>
inline void sum_rows_blocked(int64_t r0, int64_t r1, int64_t n, double* total, F&& row_fn) {
  std::vector<Acc> block(static_cast<size_t>(n));
  for (int64_t b0 = r0; b0 < r1; b0 += kSumBlock) {
    std::fill(block.begin(), block.end(), Acc(0));
    for (int64_t r = b0; r < std::min(r1, b0 + kSumBlock); ++r) row_fn(r, block.data());
    for (int64_t j = 0; j < n; ++j) total[j] += static_cast<double>(block[j]);
  }
}

// out[j] = sum over chunks c (in order) of partials[c * n + j]. Chunk by chunk, so
// the partials are read in memory order (each column's sum keeps the same order).
template <typename T, typename Acc>
inline void reduce_partials(const Acc* partials, int64_t chunks, int64_t n, T* out) {
  std::vector<Acc> sum(static_cast<size_t>(n), Acc(0));
  for (int64_t c = 0; c < chunks; ++c) {
    const Acc* part = partials + c * n;
    for (int64_t j = 0; j < n; ++j) sum[j] += part[j];
  }
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(sum[j]);
}

}  // namespace tfkernels::cpu
