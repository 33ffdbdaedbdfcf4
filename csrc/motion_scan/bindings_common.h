// Tensor-side glue shared by the CPU and CUDA registrations: argument checks, dtype
// conversions, output allocation and the reductions of the backward's partial sums. The
// kernels themselves see only MotionScanParams and raw pointers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <functional>
#include <string>
#include <tuple>

#include "motion_scan.h"

namespace pks4 {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

inline ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarKind::Float32;
    case at::kHalf:
      return ScalarKind::Float16;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    case at::kDouble:
      return ScalarKind::Float64;
    default:
      TORCH_CHECK(false, "motion_scan: expected float16, bfloat16, float32 or float64, got ", t);
  }
}

inline std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline void check_shape(const char* name, const Tensor& t, at::IntArrayRef shape,
                        const Tensor& u) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", shape_str(t));
  TORCH_CHECK(t.device() == u.device(), name, ": expected device ", u.device(),
              " (that of u), got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating dtype, got ",
              t.scalar_type());
}

struct ScanInputs {
  Tensor u, delta, A, B, C;
  OptTensor D, z, delta_bias, initial_state;
  bool delta_softplus, reverse;
};

// The compute type: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType compute_type(const Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks the arguments, converts them to what the kernels read, and fills the input side of
// `p`. The returned inputs are contiguous and must outlive the kernel call.
inline ScanInputs prepare_inputs(const ScanInputs& in, MotionScanParams& p) {
  const Tensor& u = in.u;
  TORCH_CHECK(u.dim() == 4, "u: expected 4 dims (batch, T, L, D), got ", shape_str(u));
  TORCH_CHECK(in.A.dim() == 2 && in.A.size(0) == u.size(3) && in.A.size(1) >= 1,
              "A: expected shape (D=", u.size(3), ", N) with N >= 1, got ", shape_str(in.A));
  const int64_t batch = u.size(0), T = u.size(1), L = u.size(2), Dm = u.size(3);
  const int64_t N = in.A.size(1);
  check_shape("u", u, {batch, T, L, Dm}, u);
  check_shape("delta", in.delta, {batch, T, L, Dm}, u);
  check_shape("A", in.A, {Dm, N}, u);
  check_shape("B", in.B, {batch, T, L, N}, u);
  check_shape("C", in.C, {batch, T, L, N}, u);
  if (in.D) check_shape("D", *in.D, {Dm}, u);
  if (in.z) check_shape("z", *in.z, {batch, T, L, Dm}, u);
  if (in.delta_bias) check_shape("delta_bias", *in.delta_bias, {Dm}, u);
  if (in.initial_state) check_shape("initial_state", *in.initial_state, {batch, L, Dm, N}, u);
  TORCH_CHECK(in.delta.scalar_type() == u.scalar_type(), "delta: expected dtype ",
              u.scalar_type(), " (that of u), got ", in.delta.scalar_type());
  TORCH_CHECK(!in.z || in.z->scalar_type() == u.scalar_type(), "z: expected dtype ",
              u.scalar_type(), " (that of u), got ", in.z->scalar_type());
  TORCH_CHECK(in.C.scalar_type() == in.B.scalar_type(), "C: expected dtype ",
              in.B.scalar_type(), " (that of B), got ", in.C.scalar_type());
  TORCH_CHECK(in.B.scalar_type() == u.scalar_type() || in.B.scalar_type() == at::kFloat,
              "B: expected dtype ", u.scalar_type(), " (that of u) or float32, got ",
              in.B.scalar_type());

  const auto ct = compute_type(u);
  ScanInputs out;
  out.u = u.contiguous();
  out.delta = in.delta.contiguous();
  out.A = in.A.to(ct).contiguous();
  out.B = in.B.contiguous();
  out.C = in.C.contiguous();
  if (in.D) out.D = in.D->to(ct).contiguous();
  if (in.z) out.z = in.z->contiguous();
  if (in.delta_bias) out.delta_bias = in.delta_bias->to(ct).contiguous();
  if (in.initial_state) out.initial_state = in.initial_state->to(ct).contiguous();
  out.delta_softplus = in.delta_softplus;
  out.reverse = in.reverse;

  p.batch = batch;
  p.seqlen = T;
  p.nloc = L;
  p.dim = Dm;
  p.dstate = N;
  p.input_kind = kind_of(u.scalar_type());
  p.bc_kind = kind_of(in.B.scalar_type());
  p.delta_softplus = in.delta_softplus;
  p.reverse = in.reverse;
  p.u = out.u.data_ptr();
  p.delta = out.delta.data_ptr();
  p.A = out.A.data_ptr();
  p.B = out.B.data_ptr();
  p.C = out.C.data_ptr();
  p.D = out.D ? out.D->data_ptr() : nullptr;
  p.z = out.z ? out.z->data_ptr() : nullptr;
  p.delta_bias = out.delta_bias ? out.delta_bias->data_ptr() : nullptr;
  p.initial_state = out.initial_state ? out.initial_state->data_ptr() : nullptr;
  return out;
}

using Launcher = std::function<void(const MotionScanParams&)>;

inline std::tuple<Tensor, Tensor> motion_scan_fwd_impl(const ScanInputs& args,
                                                       const Launcher& launch) {
  MotionScanParams p;
  ScanInputs in = prepare_inputs(args, p);
  Tensor y = at::empty_like(in.u);
  Tensor last = at::empty({p.batch, p.nloc, p.dim, p.dstate}, in.u.options().dtype(compute_type(in.u)));
  p.y = y.data_ptr();
  p.last_state = last.data_ptr();
  launch(p);
  return {y, last};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// `bc_partitions`: how many partial sums over D the kernel leaves for each dB_t, dC_t.
// `needs_workspace`: allocate the checkpoint workspace (device kernels cannot allocate).
inline Grads motion_scan_bwd_impl(const ScanInputs& args, const Tensor& grad_y,
                                  const OptTensor& grad_last_state, int64_t bc_partitions,
                                  bool needs_workspace, const Launcher& launch) {
  MotionScanParams p;
  ScanInputs in = prepare_inputs(args, p);
  check_shape("grad_y", grad_y, in.u.sizes(), in.u);
  const auto ct = compute_type(in.u);
  const auto f = in.u.options().dtype(ct);
  Tensor gy = grad_y.to(in.u.scalar_type()).contiguous();
  Tensor glast;
  if (grad_last_state) {
    check_shape("grad_last_state", *grad_last_state, {p.batch, p.nloc, p.dim, p.dstate}, in.u);
    glast = grad_last_state->to(ct).contiguous();
  }
  const int64_t rows = p.batch * p.nloc;
  Tensor grad_u = at::empty_like(in.u);
  Tensor grad_delta = at::empty_like(in.delta);
  Tensor grad_z = in.z ? at::empty_like(*in.z) : Tensor();
  Tensor gB = at::zeros({p.batch, p.seqlen, p.nloc, bc_partitions, p.dstate}, f);
  Tensor gC = at::zeros({p.batch, p.seqlen, p.nloc, bc_partitions, p.dstate}, f);
  Tensor gA = at::empty({rows, p.dim, p.dstate}, f);
  Tensor gD = in.D ? at::empty({rows, p.dim}, f) : Tensor();
  Tensor gbias = in.delta_bias ? at::empty({rows, p.dim}, f) : Tensor();
  // Without an initial state there is nothing to differentiate: the kernels skip the write.
  Tensor gh0 = in.initial_state ? at::empty({p.batch, p.nloc, p.dim, p.dstate}, f) : Tensor();
  p.segment = backward_segment(p.seqlen);
  Tensor workspace;
  if (needs_workspace) {
    workspace = at::empty({num_checkpoints(p.seqlen, p.segment), rows, p.dim, p.dstate}, f);
    p.workspace = workspace.data_ptr();
  }
  p.grad_y = gy.data_ptr();
  p.grad_last_state = grad_last_state ? glast.data_ptr() : nullptr;
  p.grad_u = grad_u.data_ptr();
  p.grad_delta = grad_delta.data_ptr();
  p.grad_z = in.z ? grad_z.data_ptr() : nullptr;
  p.grad_B_part = gB.data_ptr();
  p.grad_C_part = gC.data_ptr();
  p.grad_A_part = gA.data_ptr();
  p.grad_D_part = in.D ? gD.data_ptr() : nullptr;
  p.grad_bias_part = in.delta_bias ? gbias.data_ptr() : nullptr;
  p.grad_initial_state = in.initial_state ? gh0.data_ptr() : nullptr;
  p.bc_partitions = bc_partitions;
  launch(p);

  // Sums in a fixed order: the same inputs give bitwise the same gradients.
  auto none = [&]() { return at::empty({0}, in.u.options()); };
  return {grad_u,
          grad_delta,
          gA.sum(0).to(args.A.scalar_type()),
          gB.sum(3).to(args.B.scalar_type()),
          gC.sum(3).to(args.C.scalar_type()),
          in.D ? gD.sum(0).to(args.D->scalar_type()) : none(),
          in.z ? grad_z : none(),
          in.delta_bias ? gbias.sum(0).to(args.delta_bias->scalar_type()) : none(),
          args.initial_state ? gh0.to(args.initial_state->scalar_type()) : none()};
}

}  // namespace pks4
