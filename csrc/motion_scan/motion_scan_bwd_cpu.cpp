// Backward of the motion-gated selective scan on the CPU.
//
// No per-step state is stored between forward and backward. For each (batch, location) row
// and block of kLanes channels, a first pass replays the forward and keeps the state at the
// start of every segment; then each segment, last to first, is replayed from its checkpoint,
// keeping its states and decays in a per-thread buffer, and walked backward. Segments are as
// long as that buffer allows (cache-sized, see cpu_segment): for the usual clip lengths the
// whole clip is one segment and the first pass disappears, so the backward computes each
// decay exp(dt A) once. The recurrence is never run backwards through a division by
// exp(dt A), which is unstable once it underflows.
//
// Partial sums: dB_t and dC_t are summed over D inside the row (one task owns all channels of
// a location), dA, dD and d(delta_bias) are left per row and summed by the caller in a fixed
// order, so the result does not depend on the number of threads.
#include <algorithm>
#include <vector>

#include "cpu_update.h"

namespace pks4 {
namespace cpu {
namespace {

// Adds the kLanes lane partials of each state n to dB_t[n] and dC_t[n] (one partition on the
// CPU: a task owns all channels of its location).
template <typename acc_t>
inline void reduce_lanes(const acc_t* lanes_B, const acc_t* lanes_C, int64_t N, acc_t* gB,
                         acc_t* gC) {
  for (int64_t n = 0; n < N; ++n) {
    acc_t sb = 0, sc = 0;
#pragma omp simd reduction(+ : sb, sc)
    for (int64_t j = 0; j < kLanes; ++j) {
      sb += lanes_B[n * kLanes + j];
      sc += lanes_C[n * kLanes + j];
    }
    gB[n] += sb;
    gC[n] += sc;
  }
}

// Steps per segment: the segment's states and decays, (K + 1) + K arrays of N x kLanes, stay
// within about 256 KiB per thread (the L2 cache of one core); checkpoints cover longer clips.
template <typename acc_t>
int64_t cpu_segment(int64_t T, int64_t N) {
  const int64_t per_step = 2 * N * kLanes * static_cast<int64_t>(sizeof(acc_t));
  const int64_t fit = (int64_t(256) * 1024) / per_step - 1;
  return std::max<int64_t>(1, std::min<int64_t>(T, fit));
}

template <typename in_t, typename bc_t, typename acc_t>
PKS4_CPU_CLONES void backward_rows(const MotionScanParams& p, int64_t row_begin,
                                   int64_t row_end) {
  const int64_t T = p.seqlen, L = p.nloc, Dm = p.dim, N = p.dstate;
  const int64_t K = cpu_segment<acc_t>(T, N), num_chk = num_checkpoints(T, K);
  const int64_t NL = N * kLanes;
  const auto* u = static_cast<const in_t*>(p.u);
  const auto* delta = static_cast<const in_t*>(p.delta);
  const auto* z = static_cast<const in_t*>(p.z);
  const auto* B = static_cast<const bc_t*>(p.B);
  const auto* C = static_cast<const bc_t*>(p.C);
  const auto* A = static_cast<const acc_t*>(p.A);
  const auto* Dskip = static_cast<const acc_t*>(p.D);
  const auto* bias = static_cast<const acc_t*>(p.delta_bias);
  const auto* h0 = static_cast<const acc_t*>(p.initial_state);
  const auto* gy_in = static_cast<const in_t*>(p.grad_y);
  const auto* glast = static_cast<const acc_t*>(p.grad_last_state);
  auto* grad_u = static_cast<in_t*>(p.grad_u);
  auto* grad_delta = static_cast<in_t*>(p.grad_delta);
  auto* grad_z = static_cast<in_t*>(p.grad_z);
  auto* gB_part = static_cast<acc_t*>(p.grad_B_part);
  auto* gC_part = static_cast<acc_t*>(p.grad_C_part);
  auto* gA_part = static_cast<acc_t*>(p.grad_A_part);
  auto* gD_part = static_cast<acc_t*>(p.grad_D_part);
  auto* gbias_part = static_cast<acc_t*>(p.grad_bias_part);
  auto* gh0 = static_cast<acc_t*>(p.grad_initial_state);

  std::vector<acc_t> h(NL), gh(NL), gA(NL), bn(N), cn(N);
  std::vector<acc_t> checkpoints(num_chk * NL);
  std::vector<acc_t> seg_h((K + 1) * NL), seg_decay(K * NL);
  std::vector<acc_t> seg_dt(K * kLanes), seg_pre(K * kLanes), seg_y(K * kLanes);
  // The segment's u, grad_y and z, read in the replay, in time order: the backward walk then
  // touches no input tensor, whose rows lie L * D elements apart from one step to the next.
  std::vector<acc_t> seg_u(K * kLanes), seg_gy(K * kLanes), seg_z(K * kLanes);
  // dB_t[n] and dC_t[n] sum over all D channels. Summing the kLanes lanes of every (t, n) in
  // every channel block would cost a horizontal reduction per state per step; instead the
  // lanes accumulate, over all blocks of the row, in a (T, N, kLanes) buffer reduced once per
  // row. Past 1 MiB of buffer (very long clips) it is one step's (N, kLanes), reduced per step.
  const bool per_row = T * NL * 2 * static_cast<int64_t>(sizeof(acc_t)) <= (int64_t(1) << 20);
  std::vector<acc_t> lanes_B(per_row ? T * NL : NL), lanes_C(per_row ? T * NL : NL);
  alignas(64) acc_t dv[kLanes], bv[kLanes], uu[kLanes], pre[kLanes], dt[kLanes], dtu[kLanes];
  alignas(64) acc_t acc[kLanes], gys[kLanes], gdt[kLanes], gwrite[kLanes];
  alignas(64) acc_t gD_acc[kLanes], gbias_acc[kLanes], gz[kLanes], gu[kLanes];
  alignas(64) acc_t gdelta[kLanes];
  const bool softplus = p.delta_softplus;
  const StepFn<acc_t> step = pick_step<acc_t>();
  const WalkFn<acc_t> walk = pick_walk<acc_t>();
  const std::vector<acc_t> a_blocks = blocked_decay_rates(A, Dm, N);

  // Loads B_t, C_t of location `loc`, u_t and the biased logit of this channel block.
  auto load_step = [&](int64_t loc, int64_t d0, int64_t nd) {
    for (int64_t n = 0; n < N; ++n) {
      bn[n] = static_cast<acc_t>(B[loc * N + n]);
      cn[n] = static_cast<acc_t>(C[loc * N + n]);
    }
    const int64_t off = loc * Dm + d0;
    load_lanes(u + off, nd, uu);
    load_lanes(delta + off, nd, pre);
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      pre[j] += bv[j];
      dt[j] = step_size<acc_t>(pre[j], softplus);
      dtu[j] = dt[j] * uu[j];
    }
  };

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / L, l = row % L;
    std::fill(lanes_B.begin(), lanes_B.end(), acc_t(0));
    std::fill(lanes_C.begin(), lanes_C.end(), acc_t(0));
    for (int64_t d0 = 0; d0 < Dm; d0 += kLanes) {
      const int64_t nd = std::min(kLanes, Dm - d0);
      const acc_t* a_t = a_blocks.data() + d0 * N;
      const bool last_block = d0 + kLanes >= Dm;
      const int64_t next_row = last_block ? std::min(row + 1, p.batch * L - 1) : row;
      const int64_t next_b = next_row / L, next_l = next_row % L;
      const int64_t next_d0 = last_block ? 0 : d0 + kLanes;
      load_channel_constants(Dskip, bias, d0, nd, dv, bv);
      std::fill(gD_acc, gD_acc + kLanes, acc_t(0));
      std::fill(gbias_acc, gbias_acc + kLanes, acc_t(0));
      std::fill(gA.begin(), gA.end(), acc_t(0));
      load_block_states(h0, row, Dm, N, d0, nd, h.data());
      load_block_states(glast, row, Dm, N, d0, nd, gh.data());

      // Pass 1: the state at the start of every segment (nothing to do for a single one).
      std::copy(h.begin(), h.end(), checkpoints.begin());
      for (int64_t s = 0; s < (num_chk - 1) * K; ++s) {
        const int64_t t = time_index(s, T, p.reverse);
        load_step((b * T + t) * L + l, d0, nd);
        step(h.data(), h.data(), nullptr, a_t, dt, dtu, bn.data(), nullptr, nullptr, N);
        if ((s + 1) % K == 0)
          std::copy(h.begin(), h.end(), checkpoints.begin() + ((s + 1) / K) * NL);
      }

      // Pass 2: segments from last to first.
      for (int64_t c = num_chk - 1; c >= 0; --c) {
        const int64_t s0 = c * K, len = std::min(K, T - s0);
        std::copy(checkpoints.begin() + c * NL, checkpoints.begin() + (c + 1) * NL,
                  seg_h.begin());
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = time_index(s0 + i, T, p.reverse);
          load_step((b * T + t) * L + l, d0, nd);
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[j] = acc_t(0);
          step(seg_h.data() + i * NL, seg_h.data() + (i + 1) * NL, seg_decay.data() + i * NL,
               a_t, dt, dtu, bn.data(), cn.data(), acc, N);
          const int64_t off = ((b * T + t) * L + l) * Dm + d0;
          // The rows of the next channel block (or of the next row's first) at this step are
          // far away in memory: ask for them a whole block walk early.
          const int64_t ahead = ((next_b * T + t) * L + next_l) * Dm + next_d0;
          prefetch_lanes(u + ahead);
          prefetch_lanes(delta + ahead);
          prefetch_lanes(gy_in + ahead);
          if (z) prefetch_lanes(z + ahead);
          prefetch_lanes_for_write(grad_u + ahead);
          prefetch_lanes_for_write(grad_delta + ahead);
          if (z) prefetch_lanes_for_write(grad_z + ahead);
          copy_lanes(dt, seg_dt.data() + i * kLanes);
          copy_lanes(pre, seg_pre.data() + i * kLanes);
          copy_lanes(acc, seg_y.data() + i * kLanes);
          copy_lanes(uu, seg_u.data() + i * kLanes);
          load_lanes(gy_in + off, nd, seg_gy.data() + i * kLanes);
          if (z) load_lanes(z + off, nd, seg_z.data() + i * kLanes);
        }

        for (int64_t i = len - 1; i >= 0; --i) {
          const int64_t t = time_index(s0 + i, T, p.reverse);
          const int64_t loc = (b * T + t) * L + l;
          const int64_t off = loc * Dm + d0;
          for (int64_t n = 0; n < N; ++n) {
            bn[n] = static_cast<acc_t>(B[loc * N + n]);
            cn[n] = static_cast<acc_t>(C[loc * N + n]);
          }
          const acc_t* dti = seg_dt.data() + i * kLanes;
          const acc_t* yi = seg_y.data() + i * kLanes;
          copy_lanes(seg_gy.data() + i * kLanes, gys);
          copy_lanes(seg_u.data() + i * kLanes, uu);
          if (z) {
            // Gradient through the gate: y = (<C, h> + D u) * silu(z).
            const acc_t* zz = seg_z.data() + i * kLanes;
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              const acc_t g = gys[j], zj = zz[j];
              const acc_t sz = sigmoid<acc_t>(zj);
              gz[j] = g * (yi[j] + dv[j] * uu[j]) * sz * (acc_t(1) + zj * (acc_t(1) - sz));
              gys[j] = g * zj * sz;
            }
            store_lanes(gz, nd, grad_z + off);
          }
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) dtu[j] = dti[j] * uu[j];
          acc_t* lanes_Bt = lanes_B.data() + (per_row ? t * NL : 0);
          acc_t* lanes_Ct = lanes_C.data() + (per_row ? t * NL : 0);
          walk(seg_h.data() + i * NL, seg_h.data() + (i + 1) * NL, seg_decay.data() + i * NL, a_t,
               gys, dti, dtu, bn.data(), cn.data(), gh.data(), gA.data(), lanes_Bt, lanes_Ct, gdt,
               gwrite, N);
          if (!per_row) {
            reduce_lanes(lanes_Bt, lanes_Ct, N, gB_part + loc * N, gC_part + loc * N);
            std::fill(lanes_B.begin(), lanes_B.end(), acc_t(0));
            std::fill(lanes_C.begin(), lanes_C.end(), acc_t(0));
          }
          const acc_t* prei = seg_pre.data() + i * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            const acc_t gd =
                (gdt[j] + gwrite[j] * uu[j]) * step_size_slope<acc_t>(prei[j], softplus);
            gu[j] = gys[j] * dv[j] + gwrite[j] * dti[j];
            gdelta[j] = gd;
            gD_acc[j] += gys[j] * uu[j];
            gbias_acc[j] += gd;
          }
          store_lanes(gu, nd, grad_u + off);
          store_lanes(gdelta, nd, grad_delta + off);
        }
      }

      store_block_states(gA.data(), row, Dm, N, d0, nd, gA_part);
      if (gh0) store_block_states(gh.data(), row, Dm, N, d0, nd, gh0);
      for (int64_t j = 0; j < nd; ++j) {
        if (gD_part) gD_part[row * Dm + d0 + j] = gD_acc[j];
        if (gbias_part) gbias_part[row * Dm + d0 + j] = gbias_acc[j];
      }
    }
    if (per_row) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t loc = (b * T + t) * L + l;
        reduce_lanes(lanes_B.data() + t * NL, lanes_C.data() + t * NL, N, gB_part + loc * N,
                     gC_part + loc * N);
      }
    }
  }
}

}  // namespace
}  // namespace cpu

void motion_scan_bwd_cpu(const MotionScanParams& p) {
  cpu::parallel_rows(p, [&](auto in_tag, auto bc_tag, auto acc_tag, int64_t begin, int64_t end) {
    using in_t = typename decltype(in_tag)::type;
    using bc_t = typename decltype(bc_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    cpu::backward_rows<in_t, bc_t, acc_t>(p, begin, end);
  });
}

}  // namespace pks4
