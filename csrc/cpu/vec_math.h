// Branch-free fp32 math that GCC vectorises inside plain loops (the loops are
// compiled per ISA with TFK_MULTIVERSION). std::exp / std::erf per element do
// not vectorise and cost ~10x more in the softmax and GELU loops.
//
// - fast_exp2f: the attention softmax. Round-to-nearest range reduction, a
//   degree-6 polynomial for 2^f on [-0.5, 0.5] (Cephes exp2f, relative error
//   ~2e-7, about 2 ulp), and the exponent added through the bits.
// - exp2_clamped<kDegree>: the tanh-GELU and its gradient. 2^z with z clamped to
//   [-125, 126] and the exponent added to the polynomial's bits (no multiply,
//   no conversion). Degree 6 (the Cephes polynomial above, ~2e-7 relative) for
//   float results; degree 4 (minimax for relative error on [-0.5, 0.5], 2.6e-6)
//   for results rounded to 16 bits, whose half ulp is 4.9e-4 (fp16) or 2e-3 (bf16).
// - tanh_f: the attention softcap; Cephes tanhf (odd polynomial below 0.625,
//   1 - 2 / (exp(2|x|) + 1) above, with exp_f), about 2 ulp.
// - exp_f, erf_f: GELU and its gradient, within 1 ulp of the correctly rounded
//   value over [-6, 6] (checked against float64): Cephes-style exp with two-step
//   range reduction; erf from a minimax polynomial pair switching at 0.9277.
#pragma once

#include <cstdint>
#include <bit>

namespace tfkernels::cpu {

#if defined(__GNUC__)
#define TFK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TFK_ALWAYS_INLINE inline
#endif

// A bit pattern as a float.
TFK_ALWAYS_INLINE float bits_to_float(int32_t bits) { return std::bit_cast<float>(bits); }

TFK_ALWAYS_INLINE float fma_f(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

constexpr float kLog2e = 1.44269504088896341f;

// Cephes exp2f's polynomial for 2^f on [-0.5, 0.5], highest degree first (~2e-7
// relative). f32_dot's vector fast_exp2f evaluates the same Horner steps.
constexpr float kExp2Poly6[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                 5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

// 2^f for f in [-0.5, 0.5]. Degree 6: kExp2Poly6; degree 4: minimax for relative
// error (2.6e-6), for results rounded to 16 bits.
template <int kDegree>
TFK_ALWAYS_INLINE float exp2_poly(float f) {
  static_assert(kDegree == 4 || kDegree == 6, "exp2_poly: degree 4 or 6");
  float p;
  if constexpr (kDegree == 6) {
    // Spelled out: as a loop over the array, GCC kept it rolled and the callers'
    // loops unvectorised.
    p = kExp2Poly6[0];
    p = fma_f(p, f, kExp2Poly6[1]);
    p = fma_f(p, f, kExp2Poly6[2]);
    p = fma_f(p, f, kExp2Poly6[3]);
    p = fma_f(p, f, kExp2Poly6[4]);
    p = fma_f(p, f, kExp2Poly6[5]);
    p = fma_f(p, f, kExp2Poly6[6]);
  } else {
    p = 9.57010221e-3f;
    p = fma_f(p, f, 5.59178628e-2f);
    p = fma_f(p, f, 2.40247443e-1f);
    p = fma_f(p, f, 6.93121791e-1f);
    p = fma_f(p, f, 9.99999285e-1f);
  }
  return p;
}

// 2^x. Inputs below -126 give exactly 0 (the softmax wants exp(-inf) = 0 and never
// needs denormals); inputs above 127 saturate at 2^127. NaN stays NaN.
TFK_ALWAYS_INLINE float fast_exp2f(float x) {
  const bool underflow = x < -126.0f;
  float xc = x > 127.0f ? 127.0f : x;
  xc = xc < -126.0f ? -126.0f : xc;
  // Round to nearest with the 1.5 * 2^23 trick (exact for |x| < 2^22; no -ffast-math here).
  const float r = (xc + 12582912.0f) - 12582912.0f;
  const float y = exp2_poly<6>(xc - r) * bits_to_float((static_cast<int32_t>(r) + 127) << 23);
  return underflow ? 0.0f : y;
}

// 2^z for z clamped to [-125, 126]: the clamp keeps n + the polynomial's exponent
// (-1 or 0) a normal exponent, so adding n to the bits is exact. A NaN z gives an
// unspecified value (its payload may reach the exponent): callers must get NaN
// from elsewhere, as the GELU loops do by multiplying with x.
template <int kDegree>
TFK_ALWAYS_INLINE float exp2_clamped(float z) {
  z = z < -125.0f ? -125.0f : z;
  z = z > 126.0f ? 126.0f : z;
  // Round to nearest with the 1.5 * 2^23 trick: the low bits of `biased` hold n.
  const float biased = z + 12582912.0f;
  const float p = exp2_poly<kDegree>(z - (biased - 12582912.0f));
  return std::bit_cast<float>(std::bit_cast<int32_t>(p) + (std::bit_cast<int32_t>(biased) << 23));
}

// exp(x) for x clamped to [-87, 88] (no overflow, no subnormal scale).
TFK_ALWAYS_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest with the 1.5 * 2^23 trick (exact for |x * log2e| < 2^22).
  const float n = (x * kLog2e + 12582912.0f) - 12582912.0f;
  float r = fma_f(-n, 0.693359375f, x);
  r = fma_f(-n, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fma_f(p, r, 1.3981999507e-3f);
  p = fma_f(p, r, 8.3334519073e-3f);
  p = fma_f(p, r, 4.1665795894e-2f);
  p = fma_f(p, r, 1.6666665459e-1f);
  p = fma_f(p, r, 5.0000001201e-1f);
  p = fma_f(p, r * r, r) + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  return p * bits_to_float(bits);
}

TFK_ALWAYS_INLINE float erf_f(float a) {
  const float t = __builtin_fabsf(a);
  const float s = a * a;
  // |a| > 0.927734375: erf = 1 - exp(poly(t)).
  float r = fma_f(-1.72853470e-5f, t, 3.83197126e-4f);
  const float u = fma_f(-3.88396438e-3f, t, 2.42546219e-2f);
  r = fma_f(r, s, u);
  r = fma_f(r, t, -1.06777877e-1f);
  r = fma_f(r, t, -6.34846687e-1f);
  r = fma_f(r, t, -1.28717512e-1f);
  r = fma_f(r, t, -t);
  const float big = __builtin_copysignf(1.0f - exp_f(r), a);
  // |a| <= 0.927734375: erf = a + a * poly(a^2).
  float q = -5.96761703e-4f;
  q = fma_f(q, s, 4.99119423e-3f);
  q = fma_f(q, s, -2.67681349e-2f);
  q = fma_f(q, s, 1.12819925e-1f);
  q = fma_f(q, s, -3.76125336e-1f);
  q = fma_f(q, s, 1.28379166e-1f);
  const float small = fma_f(q, a, a);
  return t > 0.927734375f ? big : small;
}

// tanh(x): +-1 for |x| -> inf, NaN stays NaN (it takes the polynomial branch).
TFK_ALWAYS_INLINE float tanh_f(float x) {
  const float z = __builtin_fabsf(x);
  const float e = exp_f(z + z);
  const float big = __builtin_copysignf(1.0f - 2.0f / (e + 1.0f), x);
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = fma_f(p, s, 2.06390887954e-2f);
  p = fma_f(p, s, -5.37397155531e-2f);
  p = fma_f(p, s, 1.33314422036e-1f);
  p = fma_f(p, s, -3.33332819422e-1f);
  const float small = fma_f(p * s, x, x);
  return z > 0.625f ? big : small;
}

}  // namespace tfkernels::cpu
