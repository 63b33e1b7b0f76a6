// device_context.h for the emulated device: the launchers run on CPU tensors, the
// kernels they call run under the engine (runtime.h), and launch errors, races
// and deadlocks surface as exceptions from the launch. The limits are those of
// an H100/H200 (227 KB of opt-in shared memory a block, 132 SMs), so the
// launchers choose the same kernels and tiles as on that GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <string>

#include "emu/cuda_device.h"

namespace tfkernels {
namespace device {

struct Guard {
  explicit Guard(const at::Device&) {}
};

inline cudaStream_t current_stream() { return nullptr; }
inline int64_t max_smem_per_block() { return 227 * 1024; }
inline int num_sms() { return 132; }
// No graphs on the emulated device; TFKERNELS_EMU_CAPTURING=1 makes the launchers
// behave as during capture (no host reads of device values: the kernels must clamp
// what was never validated), so that tests can check that path.
inline bool stream_is_capturing() {
  const char* v = std::getenv("TFKERNELS_EMU_CAPTURING");
  return v != nullptr && v[0] == '1';
}

inline void check_on_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "tfkernels: ", name,
              " must be a CPU tensor for the emulated CUDA device, got ", t.device());
}

}  // namespace device
}  // namespace tfkernels

#define TFKERNELS_CHECK_LAUNCH(err)                                                                   \
  do {                                                                                                \
    const cudaError_t tfk_err_ = (err);                                                               \
    TORCH_CHECK(tfk_err_ == cudaSuccess, "tfkernels emu: launch failed: ", cudaGetErrorString(tfk_err_)); \
  } while (0)
#define TFKERNELS_CUDA_LIBRARY_IMPL(m) TFKERNELS_LIBRARY_IMPL(TFKERNELS_OP_NAMESPACE, CPU, m)
