// What the torch-facing CUDA launchers (csrc/cuda/*.cpp) need from the device,
// in one place: the current stream, the device limits, the device-placement check,
// the launch-error check and the dispatch key they register under. Two
// implementations: the real CUDA device, and the emulated device
// (csrc/emu/launcher_context.h, selected by TFKERNELS_EMULATE), whose test library
// runs the same launchers on CPU tensors under the op namespace tfkernels_emu.
#pragma once

#include <ATen/core/Tensor.h>

#include "op_namespace.h"

#if defined(TFKERNELS_EMULATE)
#include "emu/launcher_context.h"
#else

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

namespace tfkernels {
namespace device {

using Guard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
// Shared memory a block may opt into, and the SM count, of the current device.
inline int64_t max_smem_per_block() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// The current stream is being captured into a CUDA graph: no host sync allowed (a
// launcher that would read device values back skips that and relies on the kernels).
inline bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

inline void check_on_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tfkernels: ", name, " must be a CUDA tensor, got ", t.device());
}

}  // namespace device
}  // namespace tfkernels

// Turns the cudaError_t of a launch into an exception.
#define TFKERNELS_CHECK_LAUNCH(err) C10_CUDA_CHECK(err)
#define TFKERNELS_CUDA_LIBRARY_IMPL(m) TFKERNELS_LIBRARY_IMPL(TFKERNELS_OP_NAMESPACE, CUDA, m)

#endif  // TFKERNELS_EMULATE
