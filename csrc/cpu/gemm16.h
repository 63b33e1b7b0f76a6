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

#include <ATen/ATen.h>

#include "cpu/blas.h"

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

// out = a @ b for 2-D tensors (any of them may be a transposed view), multithreaded.
// 16-bit operands with the kBlas backend run MKL's bf16 GEMM into fp32 row blocks (half:
// widened to fp32 once, sgemm) and round once; fp32 runs on f32_dot's kernel in row
// blocks where the CPU has AVX-512; everything else is at::mm_out.
void mm_out_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

}  // namespace tfkernels::cpu
