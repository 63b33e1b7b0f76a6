// The attention variants of the flash kernels, per element and per row, written
// once for the four kernels (the window is part of the mask, mask.h):
//   ScoreMap  scale, or softcap c * tanh(scale q.k / c), and its slope for the backward;
//   Dropout   the keep decisions of csrc/dropout_rng.h (the CPU's function), from
//             the rng_state the kernel reads from device memory;
//   finish_row the forward epilogue of one row: 1 / denominator and lse, with the
//             per-head sink logit in the denominator.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/flash/flash_params.h"
#include "dropout_rng.h"

namespace tfkernels {
namespace flash {

constexpr float kLog2eF = 1.4426950408889634074f;
constexpr float kLn2F = 0.693147180559945309f;

// A raw score x = q.k to the softmax's units: x * pre without softcap; with it
// post * tanh(x * pre), pre = scale / c. base2: the units of exp2 (post = c log2 e,
// or pre = scale log2 e without softcap); natural: those of exp (post = c).
struct ScoreMap {
  float pre, post;
  bool capped;

  __device__ __forceinline__ static ScoreMap base2(const FwdParams& p) {
    return p.softcap > 0.0f ? ScoreMap{p.scale / p.softcap, p.softcap * kLog2eF, true}
                            : ScoreMap{p.scale_log2, 1.0f, false};
  }
  __device__ __forceinline__ static ScoreMap natural(const FwdParams& p) {
    return p.softcap > 0.0f ? ScoreMap{p.scale / p.softcap, p.softcap, true} : ScoreMap{p.scale, 1.0f, false};
  }

  // The map over a whole fragment, the softcap branch taken once (per element,
  // the compiler evaluates both sides and holds them in registers).
  template <int kN>
  __device__ __forceinline__ void apply(float (&acc)[kN][4]) const {
    if (capped) {
#pragma unroll
      for (int i = 0; i < kN; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = post * tanhf(acc[i][j] * pre);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kN; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] *= pre;
      }
    }
  }
  // The slope of a mapped value y (1 - tanh^2 = 1 - (y / post)^2).
  __device__ __forceinline__ float slope_of(float y) const {
    const float t = y * (1.0f / post);
    return capped ? 1.0f - t * t : 1.0f;
  }

  __device__ __forceinline__ float operator()(float x) const {
    x *= pre;
    return capped ? post * tanhf(x) : x;
  }
  // slope: d(score) / d(scale x) = 1 - tanh^2 (1 without softcap), the factor
  // the backward applies to dS before the scale.
  __device__ __forceinline__ float operator()(float x, float* slope) const {
    x *= pre;
    if (!capped) {
      *slope = 1.0f;
      return x;
    }
    const float t = tanhf(x);
    *slope = 1.0f - t * t;
    return post * t;
  }
};

// Dropout on the probabilities: P_ij keep_ij / (1 - p). Kept probabilities are
// scaled by `scale` (the forward folds it into the final normalisation instead).
struct Dropout {
  dropout::DropoutRng rng;
  float scale;  // 1 / (1 - p)
  bool on;

  __device__ __forceinline__ static Dropout make(const FwdParams& p) {
    Dropout d;
    d.on = p.dropout_p > 0.0f;
    d.scale = d.on ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    if (d.on) {
      d.rng = dropout::DropoutRng::make(static_cast<uint64_t>(p.rng_state[0]), static_cast<uint64_t>(p.rng_state[1]),
                                        p.dropout_p);
    } else {
      d.rng = dropout::DropoutRng{0u, 0u, 0u, 0u};
    }
    return d;
  }

  // batch_head = b * H + h (the query head).
  __device__ __forceinline__ bool keep(uint32_t batch_head, int row, int key) const {
    return rng.keep(batch_head, static_cast<uint32_t>(row), static_cast<uint32_t>(key));
  }
  // Keys key and key + 1 (key even: one Philox call): bit 0 and bit 1.
  __device__ __forceinline__ uint32_t keep_pair(uint32_t batch_head, int row, int key) const {
    const uint32_t bits = rng.keep_bits4(batch_head, static_cast<uint32_t>(row), static_cast<uint32_t>(key) >> 2);
    return (bits >> (key & 3)) & 3u;
  }
};

// The per-head sink logit (natural units), or -inf (none).
__device__ __forceinline__ float sink_logit(const FwdParams& p, int head) {
  return p.sinks != nullptr ? p.sinks[head] : -__builtin_huge_valf();
}

// One row's normalisation after the key loop: m = running max (base 2), l = sum
// of exp2(s - m) over the visible keys (pre-dropout). Returns the factor for the
// accumulated output and the lse (natural log). Without a sink: a row that sees
// no key gets 0 and -inf; l NaN or 0 (non-finite scores) gives NaN (see
// flash_fwd_kernel.h). With a finite sink: the denominator gains exp2(s2), s2 =
// sink log2 e, taken against m' = max(m, s2), so a large sink never overflows; a
// row that sees no key gets 0 and lse = sink exactly. kExact (the fp32 kernels):
// correctly rounded reciprocal and logf.
template <bool kExact>
struct RowFinish {
  float inv_l, lse;

  __device__ __forceinline__ RowFinish(float m, float l, bool sees_a_key, float sink) {
    constexpr float kNegInf = -__builtin_huge_valf();
    const float nan = __int_as_float(0x7fffffff);
    if (sink > kNegInf && !sees_a_key) {
      inv_l = 0.0f;
      lse = sink;
      return;
    }
    if (sink > kNegInf) {
      const float sink2 = sink * kLog2eF;
      const float m_all = m > sink2 ? m : sink2;
      const float a = exp2f(m - m_all);
      const float l_all = l * a + exp2f(sink2 - m_all);
      inv_l = a * (kExact ? __frcp_rn(l_all) : 1.0f / l_all);
      lse = kExact ? m_all * kLn2F + logf(l_all) : (m_all + __log2f(l_all)) * kLn2F;
      return;
    }
    inv_l = sees_a_key ? (kExact ? __frcp_rn(l) : 1.0f / l) : 0.0f;
    lse = !sees_a_key ? kNegInf : !(l > 0.0f) ? nan : kExact ? m * kLn2F + logf(l) : (m + __log2f(l)) * kLn2F;
  }
};

}  // namespace flash
}  // namespace tfkernels
