// Registers the emulated CUDA kernels with PyTorch's dispatcher, as <library>::motion_scan_fwd
// and <library>::motion_scan_bwd (the schemas of csrc/motion_scan/bindings.cpp) on the CPU key:
// the emulated device memory is host memory.
//
// Everything below the dispatcher is the CUDA path of bindings_cuda.cpp: the shared glue of
// bindings_common.h (checks, conversions, allocations, final reductions), launchers that call
// pks4::motion_scan_fwd_cuda / motion_scan_bwd_cuda with one dB/dC partial per warp of channels
// and a checkpoint workspace, then check the launch with cudaGetLastError(). Only the device
// guard and the stream (none here) differ.
//
// Also registers two helpers for the tests of the emulation itself: `convert` (the emulated
// __half / __nv_bfloat16 conversion intrinsics, element-wise) and `selftest`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "bindings_common.h"

namespace pks4emu {
extern const char* const library_name;  // library_name.cpp
void run_selftest(const std::string& name);  // selftest_kernels.cpp
}  // namespace pks4emu

namespace pks4 {
namespace {

// As in bindings_cuda.cpp.
constexpr int64_t kWarpChannels = 32;

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> fwd_emu(const Tensor& u, const Tensor& delta, const Tensor& A,
                                   const Tensor& B, const Tensor& C, const OptTensor& D,
                                   const OptTensor& z, const OptTensor& delta_bias,
                                   bool delta_softplus, bool reverse,
                                   const OptTensor& initial_state) {
  ScanInputs in{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse};
  return motion_scan_fwd_impl(in, [](const MotionScanParams& p) {
    motion_scan_fwd_cuda(p, nullptr);
    check_launch("motion_scan_fwd");
  });
}

Grads bwd_emu(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
              const Tensor& C, const OptTensor& D, const OptTensor& z,
              const OptTensor& delta_bias, bool delta_softplus, bool reverse,
              const OptTensor& initial_state, const Tensor& grad_y,
              const OptTensor& grad_last_state) {
  ScanInputs in{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse};
  const int64_t dim = u.dim() == 4 ? u.size(3) : 0;  // prepare_inputs reports a bad shape
  const int64_t bc_partitions = (dim + kWarpChannels - 1) / kWarpChannels;
  return motion_scan_bwd_impl(in, grad_y, grad_last_state, bc_partitions,
                              /*needs_workspace=*/true, [](const MotionScanParams& p) {
                                motion_scan_bwd_cuda(p, nullptr);
                                check_launch("motion_scan_bwd");
                              });
}

// One emulated conversion intrinsic over a tensor: float32 -> the 16-bit pattern as int16, or
// the pattern (int16) -> float32.
Tensor convert(const Tensor& x, const std::string& how) {
  const Tensor in = x.contiguous();
  const int64_t n = in.numel();
  const bool to_bits = how == "float2half_rn" || how == "float2bfloat16_rn";
  TORCH_CHECK(to_bits || how == "half2float" || how == "bfloat162float",
              "convert: unknown conversion ", how);
  TORCH_CHECK(in.scalar_type() == (to_bits ? at::kFloat : at::kShort), "convert: ", how,
              " takes ", to_bits ? "float32" : "int16 bit patterns", ", got ", in.scalar_type());
  Tensor out = at::empty_like(in, in.options().dtype(to_bits ? at::kShort : at::kFloat));
  if (to_bits) {
    const float* src = in.data_ptr<float>();
    auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
    for (int64_t i = 0; i < n; ++i)
      dst[i] = how == "float2half_rn" ? __float2half_rn(src[i]).__x
                                      : __float2bfloat16_rn(src[i]).__x;
  } else {
    const auto* src = reinterpret_cast<const uint16_t*>(in.data_ptr<int16_t>());
    float* dst = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      dst[i] = how == "half2float" ? __half2float(__half{src[i]})
                                   : __bfloat162float(__nv_bfloat16{src[i]});
  }
  return out;
}

void selftest(const std::string& name) { pks4emu::run_selftest(name); }

void define_ops(torch::Library& m) {
  m.def(
      "motion_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, bool reverse, "
      "Tensor? initial_state) -> (Tensor, Tensor)");
  m.def(
      "motion_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, bool reverse, "
      "Tensor? initial_state, Tensor grad_y, Tensor? grad_last_state) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Not CPU kernels: `selftest` takes no tensor to dispatch on. Registered for every key.
  m.def("convert(Tensor x, str how) -> Tensor", &convert);
  m.def("selftest(str name) -> ()", &selftest);
}

void impl_ops(torch::Library& m) {
  m.impl("motion_scan_fwd", &fwd_emu);
  m.impl("motion_scan_bwd", &bwd_emu);
}

// TORCH_LIBRARY takes the namespace as an identifier; here it comes from library_name.cpp at
// load time. (Its address is a constant, so it is set before any dynamic initialisation.)
struct Registration {
  torch::Library def{torch::Library::DEF, pks4emu::library_name, std::nullopt, __FILE__,
                     __LINE__};
  torch::Library impl{torch::Library::IMPL, pks4emu::library_name, c10::DispatchKey::CPU,
                      __FILE__, __LINE__};
  Registration() {
    define_ops(def);
    impl_ops(impl);
  }
};
const Registration registration;

}  // namespace
}  // namespace pks4
