// The CPU softmax's exponentials on f32_dot's vector kernels (f32_dot_kernels.h):
// each element exactly vec_math.h's fast_exp2f, as flash_attention_softmax.cpp's
// loops compute it, in fewer instructions (min / max for its clamps). Kept apart
// from f32_dot.h, which needs torch, for the softmax loops' torch-free file.
#pragma once

#include <cstdint>

namespace tfkernels::cpu::f32dot {

// s[j] <- 2^(s[j] c - m) for j < n; returns the sum of the new values (summed in
// vector lanes, so its last bits may differ from the loop's). Needs a CPU with
// AVX-512 or AVX2 and FMA3 (callers check f32dot::available() once per call).
float exp2_scaled_sum(float* s, int64_t n, float c, float m);
// s[j] <- 2^(s[j] c - m) for j < n.
void exp2_scaled(float* s, int64_t n, float c, float m);

}  // namespace tfkernels::cpu::f32dot
