// The instruction-set halves of f32_dot (f32_dot.h): the same kernels
// (f32_dot_kernels.h) compiled for AVX-512 in f32_dot_avx512.cpp and for AVX2 with
// FMA3 in f32_dot_avx2.cpp. f32_dot.cpp checks the CPU and picks one; nothing else
// calls these.
#pragma once

#include <cstdint>

namespace tfkernels::cpu::f32dot {

struct Backend {
  const char* isa;  // "avx512", "avx2"
  // Whether whole GEMMs run here rather than on MKL (f32dot::whole_gemms_available).
  bool whole_gemms;
  // f32dot::pack_transposed.
  void (*pack_transposed)(const float* src, int64_t ld, int64_t n, int64_t cols, float* dst, int64_t ldp);
  // panel[p][j] = op(B)[k0 + p][c0 + j] for p < steps, j < cols (rows of PackedB::kCols,
  // columns cols .. kCols zero).
  void (*pack_panel)(bool trans_b, const float* b, int64_t ldb, int64_t k0, int64_t c0, int64_t steps, int64_t cols,
                     float* panel);
  // f32dot::gemm.
  void (*gemm)(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t a_row, int64_t a_step, const float* b,
               int64_t ldb, float alpha, float* c, int64_t ldc, bool accumulate);
  // f32dot::gemm_row_max over the panels of a PackedB (one every panel_stride floats).
  void (*gemm_row_max)(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t lda, const float* panels,
                       int64_t panel_stride, int64_t c0, float* c, int64_t ldc, float* row_max);
  // f32dot::gemm_packed.
  void (*gemm_packed)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                      int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
  // f32dot::gemm_prepacked over the panels of a PackedB (one every panel_stride floats).
  void (*gemm_prepacked)(bool trans_a, int64_t m, int64_t cols, int64_t depth, float alpha, const float* a,
                         int64_t lda, const float* panels, int64_t panel_stride, int64_t k0, int64_t c0, float* c,
                         int64_t ldc, bool accumulate);
  // f32dot::exp2_scaled_sum and exp2_scaled (f32_exp.h).
  float (*exp2_scaled_sum)(float* s, int64_t n, float c, float m);
  void (*exp2_scaled)(float* s, int64_t n, float c, float m);
};

// The kernels for each instruction set, or null where this build has none (not
// x86-64, or a compiler without the target attributes).
const Backend* avx512_backend();
const Backend* avx2_backend();

}  // namespace tfkernels::cpu::f32dot
