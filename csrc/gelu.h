// GELU and its derivative, for host and device code alike (no torch headers), so
// the CPU kernels, the CUDA kernels and the GEMM epilogues share one definition.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define TFK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TFK_HOST_DEVICE inline
#endif

namespace tfkernels {

// T is float or double: the math runs at least in float even for 16-bit tensors.
template <typename T>
struct GeluConstants {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);  // 1/sqrt(2*pi)
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588); // sqrt(2/pi)
  static constexpr T kTanhCubic = T(0.044715);
};

// gelu(x) = x * Phi(x), with Phi the normal CDF (erf form) or its tanh approximation.
template <bool kTanh, typename T>
TFK_HOST_DEVICE T gelu(T x) {
  using C = GeluConstants<T>;
  if constexpr (kTanh) {
    const T inner = C::kSqrt2OverPi * (x + C::kTanhCubic * x * x * x);
    return T(0.5) * x * (T(1) + std::tanh(inner));
  } else {
    return T(0.5) * x * (T(1) + std::erf(x * C::kInvSqrt2));
  }
}

// d gelu / dx, as torch's gelu_backward defines it for each form.
template <bool kTanh, typename T>
TFK_HOST_DEVICE T gelu_grad(T x) {
  using C = GeluConstants<T>;
  if constexpr (kTanh) {
    const T x2 = x * x;
    const T inner = C::kSqrt2OverPi * (x + C::kTanhCubic * x2 * x);
    const T t = std::tanh(inner);
    const T dinner = C::kSqrt2OverPi * (T(1) + T(3) * C::kTanhCubic * x2);
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * dinner;
  } else {
    const T cdf = T(0.5) * (T(1) + std::erf(x * C::kInvSqrt2));
    const T pdf = C::kInvSqrt2Pi * std::exp(T(-0.5) * x * x);
    return cdf + x * pdf;
  }
}

}  // namespace tfkernels
