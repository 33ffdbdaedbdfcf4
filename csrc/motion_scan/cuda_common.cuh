// Helpers shared by the CUDA forward and backward kernels: launch geometry, element
// conversions, loading B_t / C_t into shared memory, and dispatch over storage kinds and state
// sizes. No torch header: the .cu files stay light to compile.
//
// Work split (both kernels): one thread per (batch, location, channel) sequence. A block holds
// kThreads consecutive channels of one (batch, location) row, so that
//   * reads and writes of u, delta, z, y and their gradients are coalesced along D;
//   * B_t and C_t, shared by all channels of a location, are read once per block into shared
//     memory;
//   * the sums over D of dB_t and dC_t are reduced inside each warp with shuffles, one partial
//     per warp (bc_partitions = ceil(D / 32)), summed afterwards by the caller in a fixed order:
//     no atomics, the gradients are deterministic.
// Grid: x = the batch * L rows (up to 2^31 - 1), y = ceil(D / kThreads) channel blocks.
//
// The N states of a thread live in registers: the kernels are templated on a compile-time
// bound kMaxN and every loop over states is unrolled and guarded by n < N. State sizes above
// kMaxStateLimit are refused: a larger bound would keep the states in local memory, and the
// backward's per-thread segment buffer ((kMaxSegment + 1) * kMaxN floats) would make the
// driver reserve local memory for every resident thread of the device (over 2 GB on an H100 for
// N = 256).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "motion_scan.h"

namespace pks4 {
namespace cuda {

constexpr int kThreads = 128;     // channels per block
constexpr int kWarpSize = 32;
constexpr int kMaxSegment = 8;    // backward_segment() never returns more
constexpr int kMaxStateLimit = 64;
constexpr unsigned kFullMask = 0xffffffffu;

// Every kernel launch goes through this macro, so that the host emulation of the CUDA execution
// model used by the tests (tests/cuda_emulation) can compile and run these same sources with a
// host compiler, which cannot parse the triple-chevron syntax.
#ifndef PKS4_LAUNCH_KERNEL
#define PKS4_LAUNCH_KERNEL(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

// ---------------------------------------------------------------------------------------------
// Element conversions (explicit intrinsics: torch builds with the implicit half conversions
// disabled). Round to nearest even, as c10::Half / c10::BFloat16 do on the CPU.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// The state decay exp(dt * A) on the special-function unit.
//
// The N decays of a step are most of a scan's arithmetic. motion_scan.h's exp_f32 is a
// polynomial written for CPU vector units (about twenty instructions, one of them a quarter-rate
// float-to-int conversion); on the GPU one MUFU.EX2 does it: exp(dt a) = 2^((dt log2 e) a), with
// dt log2 e formed once per step (decay_scale) and one multiply per state. ex2.approx has a
// relative error of about 2^-22 and flushes results below 2^-126 to zero (a state decayed to
// 1e-38 of itself is gone either way); NaN stays NaN, and a positive overflow gives +inf as
// exp_f32 does. The backward recomputes the decay with the same call on the same operands, so
// its replay and its walk see bit-identical values.

constexpr float kLog2e = 1.44269504088896341f;

__device__ __forceinline__ float decay_scale(float dt) { return dt * kLog2e; }

__device__ __forceinline__ float state_decay(float dt_log2e, float a) {
  const float x = dt_log2e * a;
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);  // the host emulation of the CUDA execution model (tests/cuda_emulation)
#endif
}

// ---------------------------------------------------------------------------------------------
// Kernel traits: storage types and the state bound.

template <int kMaxN_, typename input_t_, typename bc_t_>
struct ScanTraits {
  static constexpr int kMaxN = kMaxN_;
  using input_t = input_t_;
  using bc_t = bc_t_;
};

// Position of one thread: its (batch, location) row and channel. Threads with d >= D (the
// tail of the last channel block) run the scan on zeros, so that every thread of a block takes
// the same barriers and every lane of a warp takes part in the shuffles; they read and write
// nothing.
struct ThreadPos {
  int64_t row, b, l, d;
  bool live;
};

__device__ __forceinline__ ThreadPos thread_pos(const MotionScanParams& p) {
  ThreadPos pos;
  pos.row = blockIdx.x;
  pos.b = pos.row / p.nloc;
  pos.l = pos.row % p.nloc;
  pos.d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  pos.live = pos.d < p.dim;
  return pos;
}

// Loads B_t and C_t, as float, for the scanned steps s0 .. s0 + len - 1 of location (b, l) into
// sB / sC[i * kMaxN + n], with zeros in the padding states N <= n < kMaxN. Cooperative over the
// block; the caller puts the barriers around it. Consecutive threads read consecutive n:
// coalesced.
//
// Why the padding: the kernels then run every state loop over all kMaxN states without a
// runtime `n < N` test (which compiles to a branch per state and blocks vector loads of sB/sC).
// A padding state has A = 0, B = C = 0 and starts at 0, so it stays 0 and adds nothing; only
// a non-finite dt * u can make it NaN, and then the channel's real states are non-finite too.
template <int kMaxN, typename bc_t>
__device__ __forceinline__ void load_bc(const MotionScanParams& p, int64_t b, int64_t l,
                                        int64_t s0, int len, float* sB, float* sC) {
  const auto* B = static_cast<const bc_t*>(p.B);
  const auto* C = static_cast<const bc_t*>(p.C);
  const int N = static_cast<int>(p.dstate);
  for (int idx = threadIdx.x; idx < len * kMaxN; idx += kThreads) {
    const int i = idx / kMaxN, n = idx % kMaxN;  // kMaxN is a power of two: shifts
    float vb = 0.0f, vc = 0.0f;
    if (n < N) {
      const int64_t t = time_index(s0 + i, p.seqlen, p.reverse);
      const int64_t src = ((b * p.seqlen + t) * p.nloc + l) * p.dstate + n;
      vb = to_float(B[src]);
      vc = to_float(C[src]);
    }
    sB[idx] = vb;
    sC[idx] = vc;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: checks and dispatch.

inline void throw_error(const char* op, const std::string& what) {
  throw std::runtime_error(std::string(op) + ": " + what);
}

// Grid of one launch, or a clear error when the problem does not fit one.
inline dim3 scan_grid(const MotionScanParams& p, const char* op) {
  const int64_t rows = p.batch * p.nloc;
  const int64_t dim_blocks = (p.dim + kThreads - 1) / kThreads;
  if (rows > 2147483647LL)
    throw_error(op, "batch * L = " + std::to_string(rows) + " exceeds the CUDA grid (2^31 - 1)");
  if (dim_blocks > 65535)
    throw_error(op, "D = " + std::to_string(p.dim) + " exceeds the CUDA kernel's limit (" +
                        std::to_string(65535LL * kThreads) + ")");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(dim_blocks), 1);
}

// Whether there is anything to compute (an empty grid must not be launched).
inline bool scan_is_empty(const MotionScanParams& p) {
  return p.batch * p.nloc == 0 || p.dim == 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<input_t>, TypeTag<bc_t>) for the params' storage kinds. float64 is not
// implemented here: the Python side runs it on another backend.
template <typename F>
void dispatch_kinds(const MotionScanParams& p, const char* op, F&& f) {
  const bool bc_same = p.bc_kind == p.input_kind;
  const bool bc_f32 = p.bc_kind == ScalarKind::Float32;
  switch (p.input_kind) {
    case ScalarKind::Float32:
      if (bc_f32) return f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case ScalarKind::Float16:
      if (bc_same) return f(TypeTag<__half>{}, TypeTag<__half>{});
      if (bc_f32) return f(TypeTag<__half>{}, TypeTag<float>{});
      break;
    case ScalarKind::BFloat16:
      if (bc_same) return f(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
      if (bc_f32) return f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
      break;
    case ScalarKind::Float64:
      throw_error(op, "float64 is not supported by the CUDA kernel (use float32, float16 or "
                      "bfloat16, or another backend for float64)");
  }
  throw_error(op, "unsupported combination of input and B/C dtypes");
}

// Calls f(std::integral_constant<int, kMaxN>) with the smallest state bound that holds N.
template <typename F>
void dispatch_state(const MotionScanParams& p, const char* op, F&& f) {
  if (p.dstate < 1 || p.dstate > kMaxStateLimit)
    throw_error(op, "the CUDA kernel supports state sizes N from 1 to " +
                        std::to_string(kMaxStateLimit) + ", got N = " +
                        std::to_string(p.dstate));
  if (p.dstate <= 16) return f(std::integral_constant<int, 16>{});
  if (p.dstate <= 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 64>{});
}

}  // namespace cuda
}  // namespace pks4
