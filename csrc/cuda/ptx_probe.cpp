// Launcher of the PTX-primitive probes (csrc/cuda/probe/): a test-only op,
// tfkernels::_ptx_probe(name, input, out_numel, divisor) -> int32 [out_numel].
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <string>

#include "cuda/common/device_context.h"
#include "cuda/probe/ptx_probe.h"

namespace tfkernels {
namespace {

probe::Probe probe_named(const std::string& name) {
  static const std::pair<const char*, probe::Probe> kProbes[] = {
      {"ldmatrix_x4", probe::Probe::kLdmatrixX4}, {"ldmatrix_x4_trans", probe::Probe::kLdmatrixX4Trans},
      {"ldmatrix_x2", probe::Probe::kLdmatrixX2}, {"ldmatrix_x2_trans", probe::Probe::kLdmatrixX2Trans},
      {"mma_f16", probe::Probe::kMmaF16},         {"mma_bf16", probe::Probe::kMmaBf16},
      {"mma_tf32", probe::Probe::kMmaTf32},       {"cvt_tf32", probe::Probe::kCvtTf32},
      {"ex2", probe::Probe::kEx2},                {"fastdiv", probe::Probe::kFastDiv},
      {"cp_async", probe::Probe::kCpAsync},
  };
  for (const auto& p : kProbes) {
    if (name == p.first) return p.second;
  }
  TORCH_CHECK(false, "tfkernels: _ptx_probe: unknown probe \"", name, "\"");
}

at::Tensor ptx_probe_cuda(c10::string_view name, const at::Tensor& input, int64_t out_numel, int64_t divisor) {
  device::check_on_device(input, "input");
  TORCH_CHECK(input.scalar_type() == at::kInt, "tfkernels: _ptx_probe: input must be int32, got ",
              input.scalar_type());
  TORCH_CHECK(out_numel >= 0 && out_numel <= (1 << 20), "tfkernels: _ptx_probe: out_numel out of range");
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::zeros({out_numel}, input.options());
  const device::Guard guard(input.device());
  TFKERNELS_CHECK_LAUNCH(probe::run_ptx_probe(probe_named(std::string(name)), in.data_ptr<int32_t>(),
                                              out.data_ptr<int32_t>(), static_cast<int>(in.numel()),
                                              static_cast<uint32_t>(divisor), device::current_stream()));
  return out;
}

}  // namespace

TFKERNELS_CUDA_LIBRARY_IMPL(m) { m.impl("_ptx_probe", &ptx_probe_cuda); }

}  // namespace tfkernels
