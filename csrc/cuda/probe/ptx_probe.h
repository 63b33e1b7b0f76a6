// The PTX-primitive probes (ptx_probe.cu), callable from the torch-facing launcher.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tfkernels {
namespace probe {

enum class Probe : int {
  kLdmatrixX4, kLdmatrixX4Trans, kLdmatrixX2, kLdmatrixX2Trans,
  kMmaF16, kMmaBf16, kMmaTf32, kCvtTf32, kEx2, kFastDiv, kCpAsync,
};

// One warp runs `probe` on `in` and writes `out` (layouts in ptx_probe.cu).
cudaError_t run_ptx_probe(Probe probe, const int32_t* in, int32_t* out, int n, uint32_t divisor,
                          cudaStream_t stream);

}  // namespace probe
}  // namespace tfkernels
