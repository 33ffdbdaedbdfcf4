// Forward of the motion-gated selective scan on the CPU.
//
// Work split: one task per (batch, location) row, run in parallel with ATen's thread pool; inside
// a row, channels are processed kLanes at a time with their N states in a small (N, kLanes)
// array, so the innermost loop runs over contiguous channels and vectorises. B_t and C_t are
// shared by all channels of a location: they are loaded once per step. The (batch, T, L, D)
// layout is read and written in place: no transposes, no copies.
#include <algorithm>
#include <vector>

#include "cpu_update.h"

namespace pks4 {
namespace cpu {
namespace {

template <typename in_t, typename bc_t, typename acc_t>
PKS4_CPU_CLONES void forward_rows(const MotionScanParams& p, int64_t row_begin,
                                  int64_t row_end) {
  const int64_t T = p.seqlen, L = p.nloc, Dm = p.dim, N = p.dstate;
  const bool softplus = p.delta_softplus;
  const auto* u = static_cast<const in_t*>(p.u);
  const auto* delta = static_cast<const in_t*>(p.delta);
  const auto* z = static_cast<const in_t*>(p.z);
  const auto* B = static_cast<const bc_t*>(p.B);
  const auto* C = static_cast<const bc_t*>(p.C);
  const auto* A = static_cast<const acc_t*>(p.A);
  const auto* Dskip = static_cast<const acc_t*>(p.D);
  const auto* bias = static_cast<const acc_t*>(p.delta_bias);
  const auto* h0 = static_cast<const acc_t*>(p.initial_state);
  auto* y = static_cast<in_t*>(p.y);
  auto* last = static_cast<acc_t*>(p.last_state);

  const int64_t NL = N * kLanes, blocks = (Dm + kLanes - 1) / kLanes;
  // The states of all channels of a row, block after block: D * N values, a few KiB.
  std::vector<acc_t> h_buf(blocks * NL), bn(N), cn(N);
  // A of every channel block in the (N, kLanes) layout of the states, built once per task.
  const std::vector<acc_t> a_blocks = blocked_decay_rates(A, Dm, N);
  alignas(64) acc_t uu[kLanes], pre[kLanes], zz[kLanes], dt[kLanes], dtu[kLanes], acc[kLanes];
  alignas(64) acc_t dv[kLanes], bv[kLanes];
  std::fill(zz, zz + kLanes, acc_t(0));
  const StepFn<acc_t> step = pick_step<acc_t>();

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / L, l = row % L;
    for (int64_t d0 = 0; d0 < Dm; d0 += kLanes)
      load_block_states(h0, row, Dm, N, d0, std::min(kLanes, Dm - d0), h_buf.data() + d0 * N);
    // Time outside, channels inside: each step reads one contiguous run of D values per input
    // (the hardware prefetcher follows it), where a channel block's walk along T would jump
    // L * D elements at every step.
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_index(s, T, p.reverse);
      const int64_t loc = (b * T + t) * L + l;  // (b, t, l)
      for (int64_t n = 0; n < N; ++n) {
        bn[n] = static_cast<acc_t>(B[loc * N + n]);
        cn[n] = static_cast<acc_t>(C[loc * N + n]);
      }
      // The next step's rows (of this row, or of the next row's first step) are L * D elements
      // away: ask for them one step early.
      const int64_t next_row = s + 1 < T ? row : std::min(row + 1, p.batch * L - 1);
      const int64_t next_t = s + 1 < T ? time_index(s + 1, T, p.reverse)
                                       : time_index(0, T, p.reverse);
      const int64_t next_loc = ((next_row / L) * T + next_t) * L + next_row % L;
      for (int64_t d0 = 0; d0 < Dm; d0 += kLanes) {
        const int64_t nd = std::min(kLanes, Dm - d0);
        const int64_t off = loc * Dm + d0;
        const int64_t ahead = next_loc * Dm + d0;
        prefetch_lanes(u + ahead);
        prefetch_lanes(delta + ahead);
        if (z) prefetch_lanes(z + ahead);
        prefetch_lanes_for_write(y + ahead);
        // Lanes past D are zero and stay inert (u = 0 keeps h = 0).
        load_channel_constants(Dskip, bias, d0, nd, dv, bv);
        load_lanes(u + off, nd, uu);
        load_lanes(delta + off, nd, pre);
        if (z) load_lanes(z + off, nd, zz);
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          dt[j] = step_size<acc_t>(pre[j] + bv[j], softplus);
          dtu[j] = dt[j] * uu[j];
          acc[j] = dv[j] * uu[j];
        }
        acc_t* h = h_buf.data() + d0 * N;
        step(h, h, nullptr, a_blocks.data() + d0 * N, dt, dtu, bn.data(), cn.data(), acc, N);
        if (z) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[j] *= zz[j] * sigmoid<acc_t>(zz[j]);
        }
        store_lanes(acc, nd, y + off);
      }
    }
    for (int64_t d0 = 0; d0 < Dm; d0 += kLanes)
      store_block_states(h_buf.data() + d0 * N, row, Dm, N, d0, std::min(kLanes, Dm - d0), last);
  }
}

}  // namespace
}  // namespace cpu

void motion_scan_fwd_cpu(const MotionScanParams& p) {
  cpu::parallel_rows(p, [&](auto in_tag, auto bc_tag, auto acc_tag, int64_t begin, int64_t end) {
    using in_t = typename decltype(in_tag)::type;
    using bc_t = typename decltype(bc_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    cpu::forward_rows<in_t, bc_t, acc_t>(p, begin, end);
  });
}

}  // namespace pks4
