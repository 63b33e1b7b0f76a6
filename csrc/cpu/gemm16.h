// GEMMs of 16-bit (bf16, half) operands on the CPU: which library runs them.
//
// oneDNN (what ATen's bf16/half matmul calls) is fast only where the CPU has native
// 16-bit dot products: AVX512-BF16 or AMX-BF16 for bf16, AVX512-FP16 or AMX-FP16 for
// half. Elsewhere it falls back to a reference path: on an AVX2-only Zen 3,
// torch.mm of bf16 2048x1024 @ 1024x4096 runs at 0.4 GFLOP/s against 150 in fp32.
// MKL's bf16 GEMM (cblas_gemm_bf16bf16f32, blas.h's gemm_rm) and half widened to
// fp32 run at the fp32 rate everywhere, but on an AVX512-BF16 Zen 4 that is half
// of oneDNN's. So the kernels choose at run time:
//   Gemm16::kOneDnn  ATen (oneDNN): fp32 accumulation, bias in fp32, one rounding
//   Gemm16::kBlas    gemm_rm into fp32, bias in fp32, one rounding (same numerics)
// TFKERNELS_CPU_GEMM16=onednn|blas overrides the choice (tests run both paths;
// benchmarks can compare them); unset or "auto" decides from the CPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include "cpu/blas.h"
#include "cpu/gelu_rows.h"

namespace tfkernels::cpu {

enum class Gemm16 { kOneDnn, kBlas };

// The backend for GEMMs with operands of `dtype` (kBFloat16 or kHalf), read per call
// (the override may change between calls).
Gemm16 gemm16_backend(at::ScalarType dtype);

// Whether the GEMMs of a kernel on T operands go to oneDNN: 16-bit T on the kOneDnn backend.
template <typename T>
bool gemms_on_onednn() {
  if constexpr (is_16bit<T>) {
    return gemm16_backend(c10::CppTypeToScalarType<T>::value) == Gemm16::kOneDnn;
  } else {
    return false;
  }
}

// Whether the forward GEMM of a fused op on T operands, against a weight with the
// reduction length k, leaves oneDNN for bf16_dot's tile kernel with each weight
// packed once (blas.h's share_b): bf16 on the oneDNN backend where
// bf16dot::prepacked_applies (AVX512-BF16 without AMX; TFKERNELS_CPU_BF16_DOT=0 keeps
// oneDNN). The tiles then keep the fp32 accumulator for the epilogue (bias, GELU,
// the head layout) and round once, as the kBlas path does. Why: oneDNN, called per
// tile, packs the weight again for every tile; as one call per GEMM it is as fast as
// the tile kernel (2048 x 1024 x 4096 on the 2-core Zen 4: ~390 GFLOP/s both, best
// of 5) but the epilogue then is a separate pass.
template <typename T>
bool forward_on_bf16_tiles(int64_t k) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return gemms_on_onednn<T>() && bf16dot::prepacked_applies(k);
  } else {
    return false;
  }
}

// out = a @ b for 2-D tensors (any of them may be a transposed view), multithreaded.
// bf16 on the kOneDnn backend runs on bf16_dot's tiles where they apply (AVX512-BF16
// without AMX): b packed once, a transposed a packed per row block, each output
// rounded once in registers; the backward GEMMs of fused_qkv, linear_gelu and
// fused_mlp (2-core Zen 4, alternating calls) ran 4-7% faster than on oneDNN. 16-bit
// operands with the kBlas backend run MKL's bf16 GEMM into fp32 row blocks (half:
// widened to fp32 once, sgemm) and round once; fp32 runs on f32_dot's kernel in row
// blocks where the CPU has AVX-512; everything else is at::mm_out, a transposed 16-bit
// a first copied row-major (bf16dot::transpose16) where oneDNN runs it (it ran the
// transposed view's product at less than half the rate: 3072 x 2048 x 1024 bf16 on 2
// AMX Xeon cores, 10.5 ms against 4.7 plus 0.6 for the copy).
void mm_out_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out = x W^T + bias for x [m, k] and W [n, k] (bf16, contiguous; bias fp32 [n] or
// null) on bf16_dot's tiles, W^T packed once, each output's fp32 sum rounded once:
// a forward GEMM where forward_on_bf16_tiles(k) holds.
void linear_bf16_tiles(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const float* bias);

// out = gelu(x W^T + bias) for x [m, k] and W [n, k] rows, on the kOneDnn backend: one
// whole oneDNN GEMM on every thread, bias fused (fp32 accumulation, one rounding, as
// eager's addmm) into `pre` (or into `out` when pre is null), then a parallel GELU
// pass over the rounded value. One call per GEMM, not one per tile: oneDNN packs
// its B on every call, and tiles of rows repacked all of W once per row block
// (linear_gelu, fused_mlp: measured there).
template <typename T>
void linear_gelu_onednn(const T* x, int64_t m, int64_t k, const T* w, int64_t n, const at::Tensor& bias, T* pre,
                        T* out, GeluApprox approx) {
  T* dst = pre != nullptr ? pre : out;  // without pre, the GELU runs in place
  linear_tile_aten(x, m, k, k, w, n, k, bias, dst, n);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      gelu_fwd(dst + i * n, static_cast<const float*>(nullptr), static_cast<T*>(nullptr), out + i * n, n, approx);
    }
  });
}

}  // namespace tfkernels::cpu
