// The float elementwise loops of the CPU flash attention, cloned per ISA. Kept in
// their own translation unit, free of torch headers, so that the compiler's
// vectorisation report (-fopt-info-vec) for them is short and readable.
#include "cpu/flash_attention_softmax.h"

#include "cpu/multiversion.h"
#include "cpu/vec_math.h"

namespace tfkernels::cpu::fa {

TFK_MULTIVERSION float row_max_scaled(const float* s, int64_t n, float c) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] * c;
    m = x > m ? x : m;
  }
  return m;
}

TFK_MULTIVERSION float exp2_scaled_sum(float* s, int64_t n, float c, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float p = fast_exp2f(s[j] * c - m);
    s[j] = p;
    sum += p;
  }
  return sum;
}

TFK_MULTIVERSION void exp2_scaled(float* s, int64_t n, float c, float m) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = fast_exp2f(s[j] * c - m);
}

TFK_MULTIVERSION void softmax_grad(float* dp, const float* p, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

TFK_MULTIVERSION void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

}  // namespace tfkernels::cpu::fa
