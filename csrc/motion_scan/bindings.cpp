// Registration of the motion-gated selective scan with PyTorch's dispatcher: the schemas of
// pks4::motion_scan_fwd / pks4::motion_scan_bwd and their CPU implementations. The CUDA
// implementations live in bindings_cuda.cpp, built into a separate extension so that a
// machine without a working CUDA toolchain still gets the CPU kernels. Fake (meta) kernels
// and the autograd formula are registered from Python (pks4_layers/ops/compiled.py).
#include <torch/library.h>

#include "bindings_common.h"

namespace pks4 {
namespace {

std::tuple<Tensor, Tensor> fwd_cpu(const Tensor& u, const Tensor& delta, const Tensor& A,
                                   const Tensor& B, const Tensor& C, const OptTensor& D,
                                   const OptTensor& z, const OptTensor& delta_bias,
                                   bool delta_softplus, bool reverse,
                                   const OptTensor& initial_state) {
  ScanInputs in{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse};
  return motion_scan_fwd_impl(in, [](const MotionScanParams& p) { motion_scan_fwd_cpu(p); });
}

Grads bwd_cpu(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
              const Tensor& C, const OptTensor& D, const OptTensor& z,
              const OptTensor& delta_bias, bool delta_softplus, bool reverse,
              const OptTensor& initial_state, const Tensor& grad_y,
              const OptTensor& grad_last_state) {
  ScanInputs in{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse};
  // One task owns all channels of a location, so dB_t and dC_t need no partial sums.
  return motion_scan_bwd_impl(in, grad_y, grad_last_state, /*bc_partitions=*/1,
                              /*needs_workspace=*/false,
                              [](const MotionScanParams& p) { motion_scan_bwd_cpu(p); });
}

}  // namespace
}  // namespace pks4

TORCH_LIBRARY(pks4, m) {
  m.def(
      "motion_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, bool reverse, "
      "Tensor? initial_state) -> (Tensor, Tensor)");
  m.def(
      "motion_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, bool reverse, "
      "Tensor? initial_state, Tensor grad_y, Tensor? grad_last_state) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pks4, CPU, m) {
  m.impl("motion_scan_fwd", &pks4::fwd_cpu);
  m.impl("motion_scan_bwd", &pks4::bwd_cpu);
}
