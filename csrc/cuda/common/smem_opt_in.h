// The one dynamic-shared-memory policy of every kernel: a block may use 48 KiB of
// dynamic shared memory without asking; above that the kernel must be opted in
// with cudaFuncSetAttribute, once per device. Host code, CUDA headers only.
//
// Use: a function-local static per kernel instantiation (so one flag per template
// instance), applied before every launch; after the first call per device it costs
// one cudaGetDevice. Not a stream operation, so CUDA-graph capture is unaffected.
//
//   static DynamicSmemOptIn opt_in;
//   if (cudaError_t err = opt_in.apply(kernel, bytes); err != cudaSuccess) return err;
#pragma once

#include <cuda_runtime_api.h>

#include <mutex>

namespace tfkernels {
namespace cuda {

constexpr int kDefaultDynamicSmemBytes = 48 * 1024;

class DynamicSmemOptIn {
 public:
  template <typename Kernel>
  cudaError_t apply(Kernel kernel, int bytes) {
    if (bytes <= kDefaultDynamicSmemBytes) return cudaSuccess;
    int device = 0;
    const cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < 0 || device >= kMaxDevices) {
      return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    }
    // The first call fixes the size; later calls of the same instantiation ask for
    // the same bytes (or fewer: the fp32 flash kernels opt in their maximum).
    std::call_once(flags_[device], [&] {
      results_[device] = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    });
    return results_[device];
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::once_flag flags_[kMaxDevices];
  cudaError_t results_[kMaxDevices] = {};
};

}  // namespace cuda
}  // namespace tfkernels
