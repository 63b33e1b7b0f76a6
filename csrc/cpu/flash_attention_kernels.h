// The CPU flash-attention kernels (flash_attention.cpp) as the ops call them
// (flash_attention_ops.cpp): one forward and one backward for the padded and the
// packed variable-length layouts alike. Tensors come with a RowLayout
// (flash_attention_layout.h) that says where each (flat row, head) lives; the
// kernels read them in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu/flash_attention_band.h"
#include "cpu/flash_attention_layout.h"
#include "dropout_rng.h"

namespace tfkernels::cpu {

// The score and probability transforms beyond plain softmax, resolved once per call.
struct Variants {
  double softcap = 0;              // 0 = off
  const float* sinks = nullptr;    // [H] logits, or nullptr
  bool dropout = false;
  dropout::DropoutRng rng{};
  double keep_scale = 1;           // 1 / (1 - p)
};

// Everything about one call but the tensors.
struct AttentionCall {
  int64_t heads, kv_heads, head_dim;
  double scale;  // in double: float64 inputs need it exact
  Sequences seqs;
  Band band;
  Variants var;
};

// A tensor addressed by (flat row, head): q, k, v, out, grad_* in the inputs'
// dtype, [.., D] rows with a contiguous last dim; lse and grad_lse float32 (one
// value per row and head).
struct Rows {
  at::Tensor t;
  RowLayout layout;
};

// out and lse (every row of both is written).
void flash_forward(const AttentionCall& call, const Rows& q, const Rows& k, const Rows& v, const Rows& out,
                   const Rows& lse);

// grad_q, grad_k, grad_v (every row written) and, when the call has sinks, grad_sinks
// (float32 [H]). grad_lse may be null. Bitwise deterministic: no reduction depends
// on the threads.
void flash_backward(const AttentionCall& call, const Rows& q, const Rows& k, const Rows& v, const Rows& out,
                    const Rows& grad_out, const Rows& lse, const Rows* grad_lse, const Rows& grad_q,
                    const Rows& grad_k, const Rows& grad_v, float* grad_sinks);

}  // namespace tfkernels::cpu
