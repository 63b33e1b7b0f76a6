// Output allocation shared by every kernel. With TFKERNELS_POISON_OUTPUTS=1 in
// the environment (the test suite sets it), outputs start as NaN so that any
// element a kernel forgets to write fails the comparison instead of passing on
// whatever memory happened to hold.
#pragma once

#include <ATen/core/Tensor.h>

namespace tfkernels {

bool poison_outputs();
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_output_like(const at::Tensor& t);

}  // namespace tfkernels
