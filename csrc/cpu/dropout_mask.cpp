// The test-only op _dropout_mask on the CPU: the attention dropout's keep mask,
// bool [B, H, Sq, Sk], drawn with the same function (csrc/dropout_rng.h) as the
// attention kernels, so tests compare kernels and reference on the same mask.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "args.h"
#include "dropout_rng.h"

namespace tfkernels::cpu {
namespace {

at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t seqlen_q,
                            int64_t seqlen_k, double dropout_p) {
  check_rng_state(rng_state, rng_state, "rng_state");
  TORCH_CHECK(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
              "tfkernels: _dropout_mask sizes must be >= 0, got batch ", batch, ", heads ", heads, ", seqlen_q ",
              seqlen_q, ", seqlen_k ", seqlen_k);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "tfkernels: dropout_p must be in [0, 1), got ", dropout_p);
  const at::Tensor state = rng_state.contiguous();
  const int64_t* sv = state.data_ptr<int64_t>();
  const auto rng = dropout::DropoutRng::make(static_cast<uint64_t>(sv[0]), static_cast<uint64_t>(sv[1]),
                                             static_cast<float>(dropout_p));
  at::Tensor mask = at::empty({batch, heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  at::parallel_for(0, batch * heads * seqlen_q, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const auto bh = static_cast<uint32_t>(row / seqlen_q), i = static_cast<uint32_t>(row % seqlen_q);
      for (int64_t j = 0; j < seqlen_k; ++j) out[row * seqlen_k + j] = rng.keep(bh, i, static_cast<uint32_t>(j));
    }
  });
  return mask;
}

}  // namespace
}  // namespace tfkernels::cpu

TORCH_LIBRARY_IMPL(tfkernels, CPU, m) { m.impl("_dropout_mask", &tfkernels::cpu::dropout_mask_cpu); }
