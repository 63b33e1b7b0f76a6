// Vectorised fp32 GELU loops (see gelu_rows.h). The math is branch-free so that
// the compiler vectorises it, and each entry point is cloned per ISA
// (TFK_MULTIVERSION). Rows are processed in blocks through a small local buffer,
// which lets an output be the input buffer itself without aliasing hazards.
//
// exp_f and erf_f (cpu/vec_math.h) are within 1 ulp over [-6, 6].
#include "cpu/gelu_rows.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "cpu/multiversion.h"
#include "cpu/vec_math.h"
#include "gelu.h"

namespace tfkernels::cpu {

namespace {

using C = GeluConstants<float>;

template <bool kTanh>
TFK_ALWAYS_INLINE float gelu_f(float x) {
  if constexpr (kTanh) {
    // 0.5 * (1 + tanh(u)) = 1 / (1 + exp(-2u)): no cancellation for negative x.
    const float u = C::kSqrt2OverPi * fma_f(C::kTanhCubic * x, x * x, x);
    return x / (1.0f + exp_f(-2.0f * u));
  } else {
    return 0.5f * x * (1.0f + erf_f(x * C::kInvSqrt2));
  }
}

template <bool kTanh>
TFK_ALWAYS_INLINE float gelu_grad_f(float x) {
  if constexpr (kTanh) {
    const float x2 = x * x;
    const float u = C::kSqrt2OverPi * fma_f(C::kTanhCubic * x, x2, x);
    const float e = exp_f(-2.0f * u);
    const float s = 1.0f / (1.0f + e);  // (1 + tanh u) / 2
    const float dinner = C::kSqrt2OverPi * fma_f(3.0f * C::kTanhCubic, x2, 1.0f);
    // 0.5 (1 + t) + 0.5 x (1 - t^2) dinner with 1 + t = 2s, 1 - t = 2 e s.
    return fma_f(2.0f * x * s * (e * s), dinner, s);
  } else {
    const float cdf = 0.5f * (1.0f + erf_f(x * C::kInvSqrt2));
    const float pdf = C::kInvSqrt2Pi * exp_f(-0.5f * x * x);
    return fma_f(x, pdf, cdf);
  }
}

constexpr int64_t kBlock = 128;

template <bool kTanh, typename In, typename Out>
TFK_ALWAYS_INLINE void fwd_body(const In* in, const float* bias, Out* pre, Out* out, int64_t n) {
  float v[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    if (bias != nullptr) {
      for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(in[i0 + i]) + bias[i0 + i];
    } else {
      for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(in[i0 + i]);
    }
    if (pre != nullptr) {
      for (int64_t i = 0; i < len; ++i) pre[i0 + i] = static_cast<Out>(v[i]);
    }
    for (int64_t i = 0; i < len; ++i) out[i0 + i] = static_cast<Out>(gelu_f<kTanh>(v[i]));
  }
}

template <bool kTanh, typename G, typename P, typename Out>
TFK_ALWAYS_INLINE void bwd_body(const G* grad, const P* pre, const float* bias, Out* dpre, float* acc, int64_t n) {
  float v[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    if (bias != nullptr) {
      for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(pre[i0 + i]) + bias[i0 + i];
    } else {
      for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(pre[i0 + i]);
    }
    for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(grad[i0 + i]) * gelu_grad_f<kTanh>(v[i]);
    if (dpre != nullptr) {
      for (int64_t i = 0; i < len; ++i) dpre[i0 + i] = static_cast<Out>(v[i]);
    }
    if (acc != nullptr) {
      for (int64_t i = 0; i < len; ++i) acc[i0 + i] += v[i];
    }
  }
}

template <typename T>
void fwd_double_body(const T* in, const T* bias, T* pre, T* out, int64_t n, GeluApprox approx) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = bias != nullptr ? in[i] + bias[i] : in[i];
    if (pre != nullptr) pre[i] = v;
    out[i] = approx == GeluApprox::kTanh ? gelu<true>(v) : gelu<false>(v);
  }
}

}  // namespace

#define TFK_GELU_FWD(IN, OUT)                                                                       \
  TFK_MULTIVERSION void gelu_fwd(const IN* in, const float* bias, OUT* pre, OUT* out, int64_t n,   \
                                 GeluApprox approx) {                                              \
    if (approx == GeluApprox::kTanh) {                                                             \
      fwd_body<true>(in, bias, pre, out, n);                                                       \
    } else {                                                                                       \
      fwd_body<false>(in, bias, pre, out, n);                                                      \
    }                                                                                              \
  }

TFK_GELU_FWD(float, float)
TFK_GELU_FWD(float, c10::BFloat16)
TFK_GELU_FWD(float, c10::Half)
TFK_GELU_FWD(c10::BFloat16, c10::BFloat16)
TFK_GELU_FWD(c10::Half, c10::Half)

#define TFK_GELU_BWD(G, P)                                                                          \
  TFK_MULTIVERSION void gelu_bwd(const G* grad, const P* pre, const float* bias, P* dpre, float* acc, \
                                 int64_t n, GeluApprox approx) {                                   \
    if (approx == GeluApprox::kTanh) {                                                             \
      bwd_body<true>(grad, pre, bias, dpre, acc, n);                                               \
    } else {                                                                                       \
      bwd_body<false>(grad, pre, bias, dpre, acc, n);                                              \
    }                                                                                              \
  }

TFK_GELU_BWD(float, float)
TFK_GELU_BWD(c10::BFloat16, c10::BFloat16)
TFK_GELU_BWD(c10::Half, c10::Half)
TFK_GELU_BWD(float, c10::BFloat16)
TFK_GELU_BWD(float, c10::Half)

at::Tensor bias_in_acc_type(const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->to(dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

void gelu_fwd(const double* in, const double* bias, double* pre, double* out, int64_t n, GeluApprox approx) {
  fwd_double_body(in, bias, pre, out, n, approx);
}

void gelu_bwd(const double* grad, const double* pre, const double* bias, double* dpre, double* acc, int64_t n,
              GeluApprox approx) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = bias != nullptr ? pre[i] + bias[i] : pre[i];
    const double d = grad[i] * (approx == GeluApprox::kTanh ? gelu_grad<true>(v) : gelu_grad<false>(v));
    if (dpre != nullptr) dpre[i] = d;
    if (acc != nullptr) acc[i] += d;
  }
}

}  // namespace tfkernels::cpu
