// The test-only op _dropout_mask on CUDA: the keep mask [B,H,Sq,Sk] (bool) that the
// attention kernels draw for a given rng_state, from the same function
// (csrc/dropout_rng.h) as the CPU op and the kernels, so tests compare masks
// element for element. One thread per group of four keys (one Philox call).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash/flash_api.h"
#include "dropout_rng.h"

namespace tfkernels {
namespace flash {

namespace {

__global__ void dropout_mask_kernel(const int64_t* __restrict__ rng_state, bool* __restrict__ out, int64_t rows,
                                    int seqlen_q, int seqlen_k, float p) {
  const dropout::DropoutRng rng =
      dropout::DropoutRng::make(static_cast<uint64_t>(rng_state[0]), static_cast<uint64_t>(rng_state[1]), p);
  const int groups = (seqlen_k + 3) / 4;
  const int64_t total = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / groups;  // (b * H + h) * Sq + i
    const int group = static_cast<int>(t % groups);
    const uint32_t bits = rng.keep_bits4(static_cast<uint32_t>(row / seqlen_q), static_cast<uint32_t>(row % seqlen_q),
                                         static_cast<uint32_t>(group));
    bool* dst = out + row * seqlen_k + 4 * group;
    for (int j = 0; j < 4 && 4 * group + j < seqlen_k; ++j) dst[j] = (bits >> j) & 1u;
  }
}

}  // namespace

cudaError_t run_dropout_mask(const int64_t* rng_state, bool* out, int batch, int heads, int seqlen_q, int seqlen_k,
                             float dropout_p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(batch) * heads * seqlen_q;
  if (rows == 0 || seqlen_k == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t work = rows * ((seqlen_k + 3) / 4);
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride beyond
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(rng_state, out, rows, seqlen_q,
                                                                               seqlen_k, dropout_p);
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace tfkernels
