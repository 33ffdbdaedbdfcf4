// The motion-gated selective scan: parameter struct and per-step arithmetic.
//
// This header is shared by the CPU kernels (compiled by the host compiler) and the CUDA kernels
// (compiled by nvcc), so both builds run the same discretisation, state update and read-out. It
// includes no torch header: the .cu files stay light to compile.
//
// Per batch b, location l, channel d and state n (see pks4_layers/ops/motion_scan.py):
//   dt_t = softplus(delta_t + delta_bias)        (or delta_t + delta_bias)
//   h_t  = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
//   y_t  = sum_n C_t[n] * h_t[n] + D[d] * u_t,  then  y_t * silu(z_t)
//
// Layout: u, delta, z, y and their gradients are contiguous (batch, T, L, D); B, C are contiguous
// (batch, T, L, N); A is (D, N); D, delta_bias are (D,); states are (batch, L, D, N), float32
// (float64 for float64 inputs).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PKS4_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define PKS4_HD inline
#endif

namespace pks4 {

// Storage type of u, delta, z, y (and of their gradients), and of B, C.
enum class ScalarKind : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

struct MotionScanParams {
  int64_t batch = 0, seqlen = 0, nloc = 0, dim = 0, dstate = 0;
  ScalarKind input_kind = ScalarKind::Float32;  // u, delta, z, y, grad_y, grad_u, ...
  ScalarKind bc_kind = ScalarKind::Float32;     // B, C: the input kind, or Float32
  bool delta_softplus = true;
  bool reverse = false;

  // Inputs. A, D, delta_bias, initial_state and grad_last_state are in the compute type
  // (float32, or float64 for Float64 inputs); optional ones are null when absent.
  const void* u = nullptr;
  const void* delta = nullptr;
  const void* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const void* D = nullptr;
  const void* z = nullptr;
  const void* delta_bias = nullptr;
  const void* initial_state = nullptr;

  // Forward outputs.
  void* y = nullptr;           // input kind
  void* last_state = nullptr;  // compute type, (batch, L, D, N)

  // Backward inputs and outputs.
  const void* grad_y = nullptr;           // input kind
  const void* grad_last_state = nullptr;  // compute type or null
  void* grad_u = nullptr;                 // input kind
  void* grad_delta = nullptr;             // input kind
  void* grad_z = nullptr;                 // input kind, null without z
  // Partial sums, compute type, reduced by the caller. `bc_partitions` splits D for B and C.
  void* grad_B_part = nullptr;      // (batch, T, L, bc_partitions, N)
  void* grad_C_part = nullptr;      // (batch, T, L, bc_partitions, N)
  void* grad_A_part = nullptr;      // (batch * L, D, N)
  void* grad_D_part = nullptr;      // (batch * L, D), null without D
  void* grad_bias_part = nullptr;   // (batch * L, D), null without delta_bias
  void* grad_initial_state = nullptr;  // compute type, (batch, L, D, N), null if not needed
  int64_t bc_partitions = 1;

  // Backward scratch (device memory on CUDA): state checkpoints every `segment` steps.
  void* workspace = nullptr;
  int64_t segment = 1;
};

// Segment length of the backward's recomputation: checkpoints every `segment` steps, so the
// backward holds ceil(T / segment) checkpoints plus one segment of states.
PKS4_HD int64_t backward_segment(int64_t seqlen) {
  int64_t k = 1;
  while (k * k < seqlen) ++k;
  return k < 8 ? k : 8;
}

PKS4_HD int64_t num_checkpoints(int64_t seqlen, int64_t segment) {
  return (seqlen + segment - 1) / segment;
}

// Time index of the p-th scanned step.
PKS4_HD int64_t time_index(int64_t p, int64_t seqlen, bool reverse) {
  return reverse ? seqlen - 1 - p : p;
}

PKS4_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// exp(x) for float, vectorisable (no library call, no branch) and NaN-propagating.
// Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, and Cephes' degree-5 polynomial
// for exp(r); about 1 ulp on [-87.3, 88]. Below the range the result is 0, above it +inf.
// No -ffast-math anywhere: NaN inputs must come out as NaN.
// On the GPU (device code) the special-function unit's exp2 replaces the polynomial: one
// MUFU.EX2 instead of about twenty instructions, a relative error below 2^-21 for |x| <= 20
// (the argument's rounding included), NaN kept, +inf above the range, 0 far below it.
PKS4_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#endif
  const float hi = 88.0f, lo = -87.33654f;
  float xc = x > hi ? hi : x;  // NaN fails both comparisons and stays NaN
  xc = xc < lo ? lo : xc;
  // Round to nearest by adding and removing 1.5 * 2^23: no floorf, which is a library call on
  // baseline x86-64 (no SSE4.1) and would stop the loop from vectorising.
  float k = xc * 1.44269504088896341f + 12582912.0f;
  k = k - 12582912.0f;
  k = k == k ? k : 0.0f;  // a NaN must not reach the float-to-int conversion
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float er = p * r * r + r + 1.0f;
  float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  float res = er * scale;
  res = x < lo ? 0.0f : res;
  res = x > hi ? bits_to_float(0x7f800000u) : res;  // +inf
  return res;
}

// a / b for the few divisions of a step (denominators in [1, inf]). In device code the
// approximate division (MUFU.RCP and a multiply, about 2 ulp) replaces the IEEE one, whose
// rounding fix-up is a function call; on the CPU it is the plain division.
PKS4_HD float div_f32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

template <typename acc_t>
PKS4_HD acc_t div_acc(acc_t a, acc_t b) {
  return a / b;
}
template <>
PKS4_HD float div_acc<float>(float a, float b) {
  return div_f32(a, b);
}

// log1p(y) for y in [0, 1], vectorisable. log(1 + y) with the rounding of 1 + y corrected
// (log1p(y) = log(u) + (y - (u - 1)) / u, u = 1 + y), and Cephes' logf polynomial on the
// mantissa. Used by softplus only, whose argument keeps y in [0, 1].
PKS4_HD float log1p_unit_f32(float y) {
  float u = 1.0f + y;
  float correction = div_f32(y - (u - 1.0f), u);
  // u in [1, 2]: write u = m * 2^e with m in [sqrt(1/2), sqrt(2)).
  bool high = u > 1.41421356237f;
  float m = high ? 0.5f * u : u;
  float e = high ? 1.0f : 0.0f;
  float x = m - 1.0f;
  float z = x * x;
  float q = 7.0376836292e-2f;
  q = q * x - 1.1514610310e-1f;
  q = q * x + 1.1676998740e-1f;
  q = q * x - 1.2420140846e-1f;
  q = q * x + 1.4249322787e-1f;
  q = q * x - 1.6668057665e-1f;
  q = q * x + 2.0000714765e-1f;
  q = q * x - 2.4999993993e-1f;
  q = q * x + 3.3333331174e-1f;
  float l = q * x * z;
  l += e * -2.12194440e-4f;
  l += -0.5f * z;
  l = x + l;
  l += e * 0.693359375f;
  return l + correction;
}

template <typename acc_t>
PKS4_HD acc_t exp_acc(acc_t x);
template <>
PKS4_HD float exp_acc<float>(float x) {
  return exp_f32(x);
}
template <>
PKS4_HD double exp_acc<double>(double x) {
  return exp(x);
}

// softplus with torch's threshold: the identity above 20, log(1 + exp(x)) below.
template <typename acc_t>
PKS4_HD acc_t softplus(acc_t x);
template <>
PKS4_HD float softplus<float>(float x) {
  float pos = x > 0.0f ? x : 0.0f;
  float neg_abs = x > 0.0f ? -x : x;  // -|x|, NaN stays NaN
  float v = pos + log1p_unit_f32(exp_f32(neg_abs));
  return x > 20.0f ? x : v;
}
template <>
PKS4_HD double softplus<double>(double x) {
  return x > 20.0 ? x : log1p(exp(x));
}

// Step size dt from the biased logit.
template <typename acc_t>
PKS4_HD acc_t step_size(acc_t pre, bool use_softplus) {
  return use_softplus ? softplus<acc_t>(pre) : pre;
}

// d dt / d pre.
template <typename acc_t>
PKS4_HD acc_t step_size_slope(acc_t pre, bool use_softplus) {
  if (!use_softplus) return acc_t(1);
  acc_t s = div_acc<acc_t>(acc_t(1), acc_t(1) + exp_acc<acc_t>(-pre));
  return pre > acc_t(20) ? acc_t(1) : s;
}

template <typename acc_t>
PKS4_HD acc_t sigmoid(acc_t x) {
  return div_acc<acc_t>(acc_t(1), acc_t(1) + exp_acc<acc_t>(-x));
}

// State update h <- exp(dt A) h + (dt u) B, returning the decay for the backward.
template <typename acc_t>
PKS4_HD acc_t update_state(acc_t& h, acc_t dt, acc_t a, acc_t dt_u, acc_t b) {
  acc_t decay = exp_acc<acc_t>(dt * a);
  h = decay * h + dt_u * b;
  return decay;
}

// Entry points. Each runs on the tensors the params point at; the CUDA ones on `stream`
// (a cudaStream_t), so that this header needs no CUDA include.
void motion_scan_fwd_cpu(const MotionScanParams& params);
void motion_scan_bwd_cpu(const MotionScanParams& params);
void motion_scan_fwd_cuda(const MotionScanParams& params, void* stream);
void motion_scan_bwd_cuda(const MotionScanParams& params, void* stream);

}  // namespace pks4
