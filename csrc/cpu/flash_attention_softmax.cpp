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

TFK_MULTIVERSION void scaled_copy(float* dst, const float* src, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * a;
}

TFK_MULTIVERSION void softcap_row(float* s, int64_t n, float a, float c, float* t) {
  if (t) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float th = tanh_f(s[j] * a);
      s[j] = c * th;
      t[j] = th;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = c * tanh_f(s[j] * a);
  }
}

TFK_MULTIVERSION void tanh_grad(float* ds, const float* t, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) ds[j] *= 1.0f - t[j] * t[j];
}

TFK_MULTIVERSION void apply_keep(float* x, const uint8_t* keep, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] * a : 0.0f;
}

TFK_MULTIVERSION void dropout_keep(uint8_t* keep, const dropout::DropoutRng& rng, uint32_t batch_head, uint32_t row,
                                   int64_t g0, int64_t groups) {
  const dropout::DropoutRng r = rng;  // by value: no aliasing with `keep`
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    const uint32_t bits = r.keep_bits4(batch_head, row, static_cast<uint32_t>(g0 + g));
    keep[4 * g] = bits & 1u;
    keep[4 * g + 1] = (bits >> 1) & 1u;
    keep[4 * g + 2] = (bits >> 2) & 1u;
    keep[4 * g + 3] = (bits >> 3) & 1u;
  }
}

}  // namespace tfkernels::cpu::fa
