// A branch-free exp2 for float that GCC vectorises inside plain loops (compiled
// per ISA with TFK_MULTIVERSION): round-to-nearest range reduction, a degree-6
// polynomial for 2^f on [-0.5, 0.5] (Cephes exp2f, relative error ~2e-7, about
// 2 ulp), and the exponent added through the bits. std::exp per element does
// not vectorise and costs ~10x more in the attention softmax.
#pragma once

#include <cstdint>
#include <cstring>

namespace tfkernels::cpu {

#if defined(__GNUC__)
#define TFK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TFK_ALWAYS_INLINE inline
#endif

// 2^x. Inputs below -126 give exactly 0 (the softmax wants exp(-inf) = 0 and never
// needs denormals); inputs above 127 saturate at 2^127. NaN stays NaN.
TFK_ALWAYS_INLINE float fast_exp2f(float x) {
  const bool underflow = x < -126.0f;
  float xc = x > 127.0f ? 127.0f : x;
  xc = xc < -126.0f ? -126.0f : xc;
  // Round to nearest with the 1.5 * 2^23 trick (exact for |x| < 2^22; no -ffast-math here).
  const float r = (xc + 12582912.0f) - 12582912.0f;
  const float f = xc - r;  // in [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float y = p * two_n;
  return underflow ? 0.0f : y;
}

}  // namespace tfkernels::cpu
