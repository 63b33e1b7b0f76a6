// Row-wise elementwise loops of the CPU flash attention (the online softmax and
// dS = P * (dP - Delta)). The float versions are plain loops cloned per ISA
// (TFK_MULTIVERSION) around fast_exp2f; they are defined in
// flash_attention_softmax.cpp. The double versions use std::exp (the
// correctness path that gradcheck runs on).
//
// Domain: float works in base 2, s2 = s * scale * log2(e) and P = 2^(s2 - m2);
// double works in base e, s' = s * scale and P = e^(s' - m).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/f32_exp.h"
#include "dropout_rng.h"

namespace tfkernels::cpu::fa {

// max_j s[j] * c over j < n (n >= 1).
float row_max_scaled(const float* s, int64_t n, float c);
// s[j] <- 2^(s[j] * c - m) for j < n; returns the sum of the new values.
float exp2_scaled_sum(float* s, int64_t n, float c, float m);
// s[j] <- 2^(s[j] * c - m) for j < n.
void exp2_scaled(float* s, int64_t n, float c, float m);
// dp[j] <- p[j] * (dp[j] - delta) for j < n.
void softmax_grad(float* dp, const float* p, int64_t n, float delta);
// x[j] <- x[j] * a for j < n.
void scale_row(float* x, int64_t n, float a);
// dst[j] = src[j] * a for j < n: the forward's output rows, O = acc / l.
void scaled_copy(float* dst, const float* src, int64_t n, float a);
// Softcap: t = tanh(s[j] * a), s[j] <- c * t, and t[j] <- t when t != nullptr.
void softcap_row(float* s, int64_t n, float a, float c, float* t);
// ds[j] <- ds[j] * (1 - t[j]^2): the softcap's derivative (up to the scale).
void tanh_grad(float* ds, const float* t, int64_t n);
// x[j] <- keep[j] ? x[j] * a : 0 (dropout).
void apply_keep(float* x, const uint8_t* keep, int64_t n, float a);
// keep[t] for the keys 4 * g0 .. 4 * (g0 + groups) - 1 of row `row` of slice
// `batch_head`: 1 = kept (csrc/dropout_rng.h).
void dropout_keep(uint8_t* keep, const dropout::DropoutRng& rng, uint32_t batch_head, uint32_t row, int64_t g0,
                  int64_t groups);

inline double row_max_scaled(const double* s, int64_t n, double c) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::fmax(m, s[j] * c);
  return m;
}
inline double exp_scaled_sum(double* s, int64_t n, double c, double m) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] * c - m);
    sum += s[j];
  }
  return sum;
}
inline void exp_scaled(double* s, int64_t n, double c, double m) {
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] * c - m);
}
inline void softmax_grad(double* dp, const double* p, int64_t n, double delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}
inline void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
inline void scaled_copy(double* dst, const double* src, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * a;
}
inline void softcap_row(double* s, int64_t n, double a, double c, double* t) {
  for (int64_t j = 0; j < n; ++j) {
    const double th = std::tanh(s[j] * a);
    s[j] = c * th;
    if (t) t[j] = th;
  }
}
inline void tanh_grad(double* ds, const double* t, int64_t n) {
  for (int64_t j = 0; j < n; ++j) ds[j] *= 1.0 - t[j] * t[j];
}
inline void apply_keep(double* x, const uint8_t* keep, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] * a : 0.0;
}

// The base of the softmax domain per compute type.
template <typename T>
struct SoftmaxDomain;

template <>
struct SoftmaxDomain<float> {
  // Multiplier that takes a raw score (before the softmax scale) into the domain.
  static float score_mult(float scale) { return scale * 1.4426950408889634f; }
  // lse (natural log, float32) into the domain, and back.
  static float from_lse(float lse) { return lse * 1.4426950408889634f; }
  static float to_lse(float m, float l) { return (m + std::log2(l)) * 0.6931471805599453f; }
  static float exp(float x) { return std::exp2(x); }
  static float max(const float* s, int64_t n, float c) { return row_max_scaled(s, n, c); }
  // On f32_dot's vector kernels where the call's tile products run on them (`vector`:
  // f32dot::available(), read once per call), else the loops; both compute fast_exp2f.
  static float exp_sum(float* s, int64_t n, float c, float m, bool vector) {
    return vector ? f32dot::exp2_scaled_sum(s, n, c, m) : exp2_scaled_sum(s, n, c, m);
  }
  static void exp_rows(float* s, int64_t n, float c, float m, bool vector) {
    vector ? f32dot::exp2_scaled(s, n, c, m) : exp2_scaled(s, n, c, m);
  }
};

template <>
struct SoftmaxDomain<double> {
  static double score_mult(double scale) { return scale; }
  static double from_lse(float lse) { return static_cast<double>(lse); }
  static float to_lse(double m, double l) { return static_cast<float>(m + std::log(l)); }
  static double exp(double x) { return std::exp(x); }
  static double max(const double* s, int64_t n, double c) { return row_max_scaled(s, n, c); }
  static double exp_sum(double* s, int64_t n, double c, double m, bool) { return exp_scaled_sum(s, n, c, m); }
  static void exp_rows(double* s, int64_t n, double c, double m, bool) { exp_scaled(s, n, c, m); }
};

}  // namespace tfkernels::cpu::fa
