// Output allocation shared by every kernel. With TFKERNELS_POISON_OUTPUTS=1 in
// the environment (the test suite sets it), outputs start as NaN so that any
// element a kernel forgets to write fails the comparison instead of passing on
// whatever memory happened to hold.
//
// Large CPU outputs (1 MiB and up) take memory kept between calls, already faulted
// in (cpu/warm_buffers.h), and give it back when they are freed.
//
// Memory-bound kernels (bias_gelu) allocate their large CPU outputs with
// empty_streamed_output, which advises them for transparent huge pages before their
// first touch (Linux; a no-op where THP is off; TFKERNELS_CPU_HUGE_PAGES=0 turns it
// off). A fresh 32 MiB output costs 8192 page faults with 4 KiB pages, as much time
// as the pass that fills it: on the 2-core Zen 4 VM here bias_gelu's forward on
// [2048, 4096] fp32 took 18.9 ms with them and 8.7 ms with 2 MiB pages, fwd+bwd 44 ->
// 23 ms (medians of alternating calls; eager: 37 / 69 ms). GEMM-bound ops keep
// plain allocations: there the faults are a few percent, and in that VM a huge page
// whose memory the host has not backed yet sometimes costs more than its 512 small
// faults (linear_gelu fwd+bwd fp32 ran 4-20% slower with every buffer advised).
#pragma once

#include <ATen/core/Tensor.h>

namespace tfkernels {

bool poison_outputs();

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_output_like(const at::Tensor& t);
// empty_output_like, a large CPU output advised for huge pages (see above).
at::Tensor empty_streamed_output_like(const at::Tensor& t);

}  // namespace tfkernels
