// CUDA implementations of pks4::motion_scan_fwd / pks4::motion_scan_bwd. The schemas are
// declared by the CPU library (bindings.cpp), which must be loaded first; this library only adds
// the CUDA kernels to them. The checks, conversions, allocations and final reductions are those
// of the CPU op (bindings_common.h): only the launchers differ.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "bindings_common.h"

namespace pks4 {
namespace {

// Channels per warp of the backward kernel: it leaves one partial sum of dB_t and dC_t per warp.
constexpr int64_t kWarpChannels = 32;

void check_device(const Tensor& u) {
  TORCH_CHECK(u.is_cuda(), "u: expected a CUDA tensor for the CUDA kernel, got device ",
              u.device());
}

// Raises the error of the launch just made (bad configuration, no kernel image for this GPU...).
void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A,
                                    const Tensor& B, const Tensor& C, const OptTensor& D,
                                    const OptTensor& z, const OptTensor& delta_bias,
                                    bool delta_softplus, bool reverse,
                                    const OptTensor& initial_state) {
  check_device(u);
  c10::cuda::CUDAGuard guard(u.device());
  ScanInputs in{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse};
  return motion_scan_fwd_impl(in, [](const MotionScanParams& p) {
    motion_scan_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
    check_launch("motion_scan_fwd");
  });
}

Grads bwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
               const Tensor& C, const OptTensor& D, const OptTensor& z,
               const OptTensor& delta_bias, bool delta_softplus, bool reverse,
               const OptTensor& initial_state, const Tensor& grad_y,
               const OptTensor& grad_last_state) {
  check_device(u);
  c10::cuda::CUDAGuard guard(u.device());
  ScanInputs in{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse};
  // One partial of dB_t, dC_t per warp of channels; the kernel keeps its state checkpoints in
  // a workspace allocated here (device code cannot allocate).
  const int64_t dim = u.dim() == 4 ? u.size(3) : 0;  // prepare_inputs reports a bad shape
  const int64_t bc_partitions = (dim + kWarpChannels - 1) / kWarpChannels;
  return motion_scan_bwd_impl(in, grad_y, grad_last_state, bc_partitions,
                              /*needs_workspace=*/true, [](const MotionScanParams& p) {
                                motion_scan_bwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
                                check_launch("motion_scan_bwd");
                              });
}

}  // namespace
}  // namespace pks4

TORCH_LIBRARY_IMPL(pks4, CUDA, m) {
  m.impl("motion_scan_fwd", &pks4::fwd_cuda);
  m.impl("motion_scan_bwd", &pks4::bwd_cuda);
}
