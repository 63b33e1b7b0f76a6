// Output allocation shared by every kernel. With TFKERNELS_POISON_OUTPUTS=1 in
// the environment (the test suite sets it), outputs start as NaN so that any
// element a kernel forgets to write fails the comparison instead of passing on
// whatever memory happened to hold.
//
// Large CPU buffers (outputs and scratch alike, from 8 MiB) are advised for
// transparent huge pages before their first touch (Linux; a no-op where THP is
// off; TFKERNELS_CPU_HUGE_PAGES=0 turns it off). A fresh 32 MiB buffer costs 8192
// page faults with 4 KiB pages: on the 2-core Zen 4 VM here bias_gelu's forward on
// [2048, 4096] fp32 took 18.9 ms with them and 8.7 ms with 2 MiB pages (median of
// 15 alternating calls; eager: 36.8 ms). In a VM a huge page whose memory the host
// has not backed yet can cost more than its 512 small faults (single runs of 40-50 ms
// per 32 MiB were seen), so the gain is a median, not a guarantee.
#pragma once

#include <ATen/core/Tensor.h>

namespace tfkernels {

bool poison_outputs();
// at::empty, with a large CPU buffer advised for huge pages (never poisoned: scratch).
at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_output_like(const at::Tensor& t);

}  // namespace tfkernels
