// Forward of the motion-gated selective scan on CUDA.
//
// One thread per (batch, location, channel) sequence, its N states in registers (see
// cuda_common.cuh for the work split). The steps are taken in chunks: the block loads B_t and
// C_t of a chunk of steps into shared memory once, then every thread scans the chunk. The
// arithmetic of a step is that of the CPU kernel (motion_scan_fwd_cpu.cpp): the same functions
// of motion_scan.h, in the same order, except the state decay, which runs on the special-function
// unit (state_decay in cuda_common.cuh).
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "motion_scan.h"

namespace pks4 {
namespace cuda {
namespace {

// Floats of B (and as many of C) staged in shared memory per chunk: 4 KB each.
constexpr int kFwdChunkElems = 1024;

template <typename Ktraits>
__global__ void __launch_bounds__(kThreads)
    motion_scan_fwd_kernel(const MotionScanParams p) {
  constexpr int kMaxN = Ktraits::kMaxN;
  constexpr int kChunk = kFwdChunkElems / kMaxN;  // steps per chunk
  using input_t = typename Ktraits::input_t;
  using bc_t = typename Ktraits::bc_t;

  alignas(16) __shared__ float smem_B[kChunk * kMaxN];
  alignas(16) __shared__ float smem_C[kChunk * kMaxN];

  const int64_t T = p.seqlen, L = p.nloc, Dm = p.dim;
  const int N = static_cast<int>(p.dstate);
  const bool use_softplus = p.delta_softplus;
  const ThreadPos pos = thread_pos(p);
  const int64_t b = pos.b, l = pos.l, d = pos.d;
  const bool live = pos.live;

  const auto* __restrict__ u = static_cast<const input_t*>(p.u);
  const auto* __restrict__ delta = static_cast<const input_t*>(p.delta);
  const auto* __restrict__ z = static_cast<const input_t*>(p.z);
  const auto* __restrict__ A = static_cast<const float*>(p.A);
  const auto* __restrict__ Dskip = static_cast<const float*>(p.D);
  const auto* __restrict__ bias = static_cast<const float*>(p.delta_bias);
  const auto* __restrict__ h0 = static_cast<const float*>(p.initial_state);
  auto* __restrict__ y = static_cast<input_t*>(p.y);
  auto* __restrict__ last = static_cast<float*>(p.last_state);

  // Per-thread constants; a thread past D keeps zeros and stays inert (u = 0 keeps h = 0).
  const float dv = live && Dskip ? Dskip[d] : 0.0f;
  const float bv = live && bias ? bias[d] : 0.0f;
  const int64_t state_off = (pos.row * Dm + d) * N;  // (b, l, d, 0) of a (batch, L, D, N) state
  // States N .. kMaxN - 1 are padding (see load_bc): A = 0 and h = 0 there.
  float a[kMaxN], h[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    a[n] = live && n < N ? A[d * N + n] : 0.0f;
    h[n] = live && h0 && n < N ? h0[state_off + n] : 0.0f;
  }

  // u, delta and z of the next step are loaded while the current one is computed: a thread's
  // steps are sequential, and without this lookahead each would start by waiting for its loads.
  // Offsets of (b, t, l, d) move by one frame, L * D elements, per scanned step.
  const int64_t step_stride = (p.reverse ? -L : L) * Dm;
  int64_t off = ((b * T + time_index(0, T, p.reverse)) * L + l) * Dm + d;
  float u_next = 0.0f, pre_next = 0.0f, z_next = 0.0f;
  auto load_step = [&](int64_t at) {
    u_next = live ? to_float(u[at]) : 0.0f;
    pre_next = live ? to_float(delta[at]) : 0.0f;
    z_next = live && z ? to_float(z[at]) : 0.0f;
  };
  if (T > 0) load_step(off);

  for (int64_t s0 = 0; s0 < T; s0 += kChunk) {
    const int len = static_cast<int>(T - s0 < kChunk ? T - s0 : kChunk);
    __syncthreads();  // the previous chunk is consumed by every thread
    load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);
    __syncthreads();
    for (int i = 0; i < len; ++i, off += step_stride) {
      const float uu = u_next, pre = pre_next, zz = z_next;
      if (s0 + i + 1 < T) load_step(off + step_stride);
      const float dt = step_size<float>(pre + bv, use_softplus);
      const float dtu = dt * uu;
      const float dt2 = decay_scale(dt);
      float acc = dv * uu;
      const float* sB = smem_B + i * kMaxN;
      const float* sC = smem_C + i * kMaxN;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        h[n] = state_decay(dt2, a[n]) * h[n] + dtu * sB[n];
        acc += sC[n] * h[n];
      }
      if (z) acc *= zz * sigmoid<float>(zz);
      if (live) y[off] = from_float<input_t>(acc);
    }
  }

  if (live) {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n < N) last[state_off + n] = h[n];
    }
  }
}

template <typename Ktraits>
void launch_fwd(const MotionScanParams& p, cudaStream_t stream) {
  const dim3 grid = scan_grid(p, "motion_scan_fwd");
  PKS4_LAUNCH_KERNEL(motion_scan_fwd_kernel<Ktraits>, grid, kThreads, 0, stream, p);
}

}  // namespace
}  // namespace cuda

void motion_scan_fwd_cuda(const MotionScanParams& p, void* stream) {
  using namespace cuda;
  const char* op = "motion_scan_fwd";
  dispatch_kinds(p, op, [&](auto in_tag, auto bc_tag) {
    using input_t = typename decltype(in_tag)::type;
    using bc_t = typename decltype(bc_tag)::type;
    dispatch_state(p, op, [&](auto max_n) {
      constexpr int kMaxN = decltype(max_n)::value;
      if (scan_is_empty(p)) return;
      launch_fwd<ScanTraits<kMaxN, input_t, bc_t>>(p, static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace pks4
