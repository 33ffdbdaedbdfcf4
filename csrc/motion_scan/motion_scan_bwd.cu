// Backward of the motion-gated selective scan on CUDA.
//
// One thread per (batch, location, channel) sequence, as in the forward (see cuda_common.cuh),
// running the algorithm of the CPU kernel (motion_scan_bwd_cpu.cpp) with the same per-step
// arithmetic:
//   pass 1 replays the forward and stores the state at the start of every segment of
//          p.segment (<= 8) steps in p.workspace;
//   pass 2 takes the segments last to first: reloads the checkpoint, replays the segment keeping
//          its states in a per-thread buffer, then walks it backward.
// The recurrence is never run backwards through a division by exp(dt A). The decays of a
// segment are recomputed in the walk instead of stored (state_decay(dt log2 e, a), the same call
// on the same operands as in the replay, so the same value): the per-thread buffer, which lives in
// local memory, stays at (segment + 1) * kMaxN floats.
//
// Outputs: grad_u, grad_delta, grad_z per thread in the input kind; dA, dD, d(delta_bias) and
// the gradient of the initial state per thread (summed over rows by the caller); dB_t and dC_t
// summed over the 32 channels of each warp with shuffles (a reduce-scatter butterfly, 16 states
// at a time), one partial per warp. No atomics.
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "motion_scan.h"

namespace pks4 {
namespace cuda {
namespace {

// Warp sums of dB_t and dC_t, kSumGroup states at a time. Summing each state's value over the
// 32 lanes separately costs 5 shuffles per state; a reduce-scatter butterfly sums all 16 at once
// with 16: at each exchange a lane keeps half of its values, adds the partner's copy of that
// half and sends the other half, so the values halve while the lanes holding each sum double.
constexpr int kSumGroup = 16;

// One exchange of the butterfly across lanes `offset` apart: each lane keeps kHalf of its
// 2 * kHalf values (the upper half where its lane bit `offset` is set).
template <int kHalf>
__device__ __forceinline__ void exchange_halves(float (&v)[kSumGroup], int lane, int offset) {
  const bool upper = (lane & offset) != 0;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float send = upper ? v[j] : v[j + kHalf];
    const float keep = upper ? v[j + kHalf] : v[j];
    v[j] = keep + __shfl_xor_sync(kFullMask, send, offset);
  }
}

// The sums over the warp's 32 lanes of v[0..15]: lanes 2m and 2m + 1 return the sum of v[m]
// (m = scatter_index(lane): the lane bits 4..1 that picked the halves). v is overwritten.
__device__ __forceinline__ float warp_sum_scatter(float (&v)[kSumGroup], int lane) {
  exchange_halves<8>(v, lane, 16);
  exchange_halves<4>(v, lane, 8);
  exchange_halves<2>(v, lane, 4);
  exchange_halves<1>(v, lane, 2);
  return v[0] + __shfl_xor_sync(kFullMask, v[0], 1);
}

__device__ __forceinline__ int scatter_index(int lane) { return lane >> 1; }
// One of the two lanes holding each sum stores it.
__device__ __forceinline__ bool scatter_writer(int lane) { return (lane & 1) == 0; }

template <typename Ktraits>
__global__ void __launch_bounds__(kThreads)
    motion_scan_bwd_kernel(const MotionScanParams p) {
  constexpr int kMaxN = Ktraits::kMaxN;
  static_assert(kMaxN % kSumGroup == 0, "the warp sums take the states kSumGroup at a time");
  using input_t = typename Ktraits::input_t;
  using bc_t = typename Ktraits::bc_t;

  // B_t, C_t of the current segment.
  alignas(16) __shared__ float smem_B[kMaxSegment * kMaxN];
  alignas(16) __shared__ float smem_C[kMaxSegment * kMaxN];

  const int64_t T = p.seqlen, L = p.nloc, Dm = p.dim;
  const int64_t K = p.segment, num_chk = num_checkpoints(T, K);
  const int64_t rows = p.batch * L;
  const int N = static_cast<int>(p.dstate);
  const bool use_softplus = p.delta_softplus;
  const ThreadPos pos = thread_pos(p);
  const int64_t row = pos.row, b = pos.b, l = pos.l, d = pos.d;
  const bool live = pos.live;
  const int lane = threadIdx.x % kWarpSize;
  // Index of this warp's 32 channels along D: its partial of dB_t / dC_t. A warp wholly past D
  // writes none.
  const int64_t warp_part = d / kWarpSize;
  const bool warp_live = warp_part < p.bc_partitions;

  const auto* __restrict__ u = static_cast<const input_t*>(p.u);
  const auto* __restrict__ delta = static_cast<const input_t*>(p.delta);
  const auto* __restrict__ z = static_cast<const input_t*>(p.z);
  const auto* __restrict__ A = static_cast<const float*>(p.A);
  const auto* __restrict__ Dskip = static_cast<const float*>(p.D);
  const auto* __restrict__ bias = static_cast<const float*>(p.delta_bias);
  const auto* __restrict__ h0 = static_cast<const float*>(p.initial_state);
  const auto* __restrict__ gy_in = static_cast<const input_t*>(p.grad_y);
  const auto* __restrict__ glast = static_cast<const float*>(p.grad_last_state);
  auto* __restrict__ grad_u = static_cast<input_t*>(p.grad_u);
  auto* __restrict__ grad_delta = static_cast<input_t*>(p.grad_delta);
  auto* __restrict__ grad_z = static_cast<input_t*>(p.grad_z);
  auto* __restrict__ gB_part = static_cast<float*>(p.grad_B_part);
  auto* __restrict__ gC_part = static_cast<float*>(p.grad_C_part);
  auto* __restrict__ gA_part = static_cast<float*>(p.grad_A_part);
  auto* __restrict__ gD_part = static_cast<float*>(p.grad_D_part);
  auto* __restrict__ gbias_part = static_cast<float*>(p.grad_bias_part);
  auto* __restrict__ gh0 = static_cast<float*>(p.grad_initial_state);
  // Checkpoint c of this thread, state n, at ((c * rows + row) * N + n) * D + d: consecutive
  // threads touch consecutive addresses.
  auto* __restrict__ workspace = static_cast<float*>(p.workspace);
  auto chk_index = [&](int64_t c, int n) { return ((c * rows + row) * N + n) * Dm + d; };

  const float dv = live && Dskip ? Dskip[d] : 0.0f;
  const float bv = live && bias ? bias[d] : 0.0f;
  const int64_t state_off = (row * Dm + d) * N;  // (b, l, d, 0) of a (batch, L, D, N) state
  // States N .. kMaxN - 1 are padding (see load_bc): A = 0, h = 0 and no gradient flows
  // there, so the state loops need no `n < N` test; only the stores of states are guarded.
  float a[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) a[n] = live && n < N ? A[d * N + n] : 0.0f;

  // u_t and the biased logit of scanned step s (zeros past D).
  auto load_u = [&](int64_t off) { return live ? to_float(u[off]) : 0.0f; };
  auto load_pre = [&](int64_t off) { return live ? to_float(delta[off]) + bv : 0.0f; };
  auto step_offset = [&](int64_t s) {
    const int64_t t = time_index(s, T, p.reverse);
    return ((b * T + t) * L + l) * Dm + d;  // (b, t, l, d)
  };

  // Pass 1: the state at the start of every segment. The last segment's steps are not needed.
  {
    float h[kMaxN];
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) h[n] = live && h0 && n < N ? h0[state_off + n] : 0.0f;
    for (int64_t c = 0; c < num_chk; ++c) {
      if (live) {
#pragma unroll
        for (int n = 0; n < kMaxN; ++n) {
          if (n < N) workspace[chk_index(c, n)] = h[n];
        }
      }
      if (c == num_chk - 1) break;  // uniform over the block
      const int64_t s0 = c * K;
      const int len = static_cast<int>(K);  // not the last segment: a full one
      __syncthreads();
      load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);
      __syncthreads();
      for (int i = 0; i < len; ++i) {
        const int64_t off = step_offset(s0 + i);
        const float uu = load_u(off);
        const float dt = step_size<float>(load_pre(off), use_softplus);
        const float dtu = dt * uu;
        const float dt2 = decay_scale(dt);
        const float* sB = smem_B + i * kMaxN;
#pragma unroll
        for (int n = 0; n < kMaxN; ++n) h[n] = state_decay(dt2, a[n]) * h[n] + dtu * sB[n];
      }
    }
  }

  // Pass 2: segments from last to first.
  float gh[kMaxN], gA[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    gh[n] = live && glast && n < N ? glast[state_off + n] : 0.0f;
    gA[n] = 0.0f;
  }
  float gD_acc = 0.0f, gbias_acc = 0.0f;
  // States h_{s0 - 1 + i} of the segment, i = 0 .. len (slot 0: the checkpoint), and per step
  // dt, the biased logit, u and <C_t, h_t>.
  float seg_h[(kMaxSegment + 1) * kMaxN];
  float seg_dt[kMaxSegment], seg_pre[kMaxSegment], seg_u[kMaxSegment], seg_y[kMaxSegment];

  for (int64_t c = num_chk - 1; c >= 0; --c) {
    const int64_t s0 = c * K;
    const int len = static_cast<int>(T - s0 < K ? T - s0 : K);
    __syncthreads();  // the previous segment's B, C are consumed by every thread
    load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);
    __syncthreads();

    // Replay of the segment from its checkpoint.
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) seg_h[n] = live && n < N ? workspace[chk_index(c, n)] : 0.0f;
    for (int i = 0; i < len; ++i) {
      const int64_t off = step_offset(s0 + i);
      const float uu = load_u(off);
      const float pre = load_pre(off);
      const float dt = step_size<float>(pre, use_softplus);
      const float dtu = dt * uu;
      const float dt2 = decay_scale(dt);
      const float* sB = smem_B + i * kMaxN;
      const float* sC = smem_C + i * kMaxN;
      float acc = 0.0f;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        const float hv = state_decay(dt2, a[n]) * seg_h[i * kMaxN + n] + dtu * sB[n];
        seg_h[(i + 1) * kMaxN + n] = hv;
        acc += sC[n] * hv;
      }
      seg_dt[i] = dt;
      seg_pre[i] = pre;
      seg_u[i] = uu;
      seg_y[i] = acc;
    }

    // Walk of the segment backward.
    for (int i = len - 1; i >= 0; --i) {
      const int64_t t = time_index(s0 + i, T, p.reverse);
      const int64_t loc = (b * T + t) * L + l;  // (b, t, l)
      const int64_t off = loc * Dm + d;
      const float dt = seg_dt[i];
      const float uu = seg_u[i];
      const float g = live ? to_float(gy_in[off]) : 0.0f;
      // Gradient through the skip and the gate: y = (<C, h> + D u) * silu(z).
      float gys = g;
      if (z) {
        const float zj = live ? to_float(z[off]) : 0.0f;
        const float sz = sigmoid<float>(zj);
        const float y_pre = seg_y[i] + dv * uu;
        gys = g * zj * sz;
        if (live) grad_z[off] = from_float<input_t>(g * y_pre * sz * (1.0f + zj * (1.0f - sz)));
      }
      const float dtu = dt * uu;
      const float dt2 = decay_scale(dt);
      float gdt = 0.0f, gwrite = 0.0f;
      const float* sB = smem_B + i * kMaxN;
      const float* sC = smem_C + i * kMaxN;
      // (b, t, l, warp_part, n): this warp's partial sums of dB_t and dC_t.
      const int64_t part_off = (loc * p.bc_partitions + warp_part) * N;
#pragma unroll
      for (int g0 = 0; g0 < kMaxN; g0 += kSumGroup) {
        if (g0 >= N) break;  // a group of padding states only; N is uniform over the block
        // The states of one group: their terms of dB_t, dC_t, then one warp reduction of all.
        float part_b[kSumGroup], part_c[kSumGroup];
#pragma unroll
        for (int j = 0; j < kSumGroup; ++j) {
          const int n = g0 + j;
          const float hp = seg_h[i * kMaxN + n];
          const float hn = seg_h[(i + 1) * kMaxN + n];
          const float dec = state_decay(dt2, a[n]);  // the decay the replay applied
          const float bnv = sB[n], cnv = sC[n];
          // y_t reads h_t through C_t.
          const float gg = gh[n] + gys * cnv;
          // h_t = exp(dt A) h_{t-1} + dt u B_t
          const float g_log_decay = gg * hp * dec;
          gA[n] += g_log_decay * dt;
          gdt += g_log_decay * a[n];
          gwrite += gg * bnv;
          gh[n] = gg * dec;
          // Threads past D add nothing, whatever B_t, C_t hold.
          part_b[j] = live ? gg * dtu : 0.0f;
          part_c[j] = live ? gys * hn : 0.0f;
        }
        // Every lane of the warp takes the shuffles.
        const float sum_b = warp_sum_scatter(part_b, lane);
        const float sum_c = warp_sum_scatter(part_c, lane);
        const int n = g0 + scatter_index(lane);
        if (warp_live && scatter_writer(lane) && n < N) {
          gB_part[part_off + n] = sum_b;
          gC_part[part_off + n] = sum_c;
        }
      }
      const float gd = (gdt + gwrite * uu) * step_size_slope<float>(seg_pre[i], use_softplus);
      if (live) {
        grad_u[off] = from_float<input_t>(gys * dv + gwrite * dt);
        grad_delta[off] = from_float<input_t>(gd);
      }
      gD_acc += gys * uu;
      gbias_acc += gd;
    }
  }

  if (live) {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n < N) {
        gA_part[state_off + n] = gA[n];
        if (gh0) gh0[state_off + n] = gh[n];
      }
    }
    if (gD_part) gD_part[row * Dm + d] = gD_acc;
    if (gbias_part) gbias_part[row * Dm + d] = gbias_acc;
  }
}

template <typename Ktraits>
void launch_bwd(const MotionScanParams& p, cudaStream_t stream) {
  const dim3 grid = scan_grid(p, "motion_scan_bwd");
  PKS4_LAUNCH_KERNEL(motion_scan_bwd_kernel<Ktraits>, grid, kThreads, 0, stream, p);
}

}  // namespace
}  // namespace cuda

void motion_scan_bwd_cuda(const MotionScanParams& p, void* stream) {
  using namespace cuda;
  const char* op = "motion_scan_bwd";
  dispatch_kinds(p, op, [&](auto in_tag, auto bc_tag) {
    using input_t = typename decltype(in_tag)::type;
    using bc_t = typename decltype(bc_tag)::type;
    dispatch_state(p, op, [&](auto max_n) {
      constexpr int kMaxN = decltype(max_n)::value;
      if (scan_is_empty(p)) return;
      // The kernel's segment buffer holds kMaxSegment steps; the caller sizes the workspace
      // for p.segment and the dB / dC partials for one per warp.
      if (p.segment < 1 || p.segment > kMaxSegment)
        throw_error(op, "segment length " + std::to_string(p.segment) + " is outside 1.." +
                            std::to_string(kMaxSegment));
      const int64_t warps = (p.dim + kWarpSize - 1) / kWarpSize;
      if (p.bc_partitions != warps)
        throw_error(op, "expected bc_partitions = ceil(D / 32) = " + std::to_string(warps) +
                            ", got " + std::to_string(p.bc_partitions));
      if (p.seqlen > 0 && p.workspace == nullptr) throw_error(op, "no workspace");
      launch_bwd<ScanTraits<kMaxN, input_t, bc_t>>(p, static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace pks4
