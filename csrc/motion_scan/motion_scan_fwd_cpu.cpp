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

  std::vector<acc_t> h_buf(N * kLanes), a_buf(N * kLanes), bn(N), cn(N);
  acc_t* __restrict h = h_buf.data();
  acc_t* __restrict a_t = a_buf.data();
  alignas(64) acc_t uu[kLanes], pre[kLanes], zz[kLanes], dt[kLanes], dtu[kLanes], acc[kLanes];
  alignas(64) acc_t dv[kLanes], bv[kLanes];
  const UpdateFn<acc_t> update = pick_update<acc_t>();

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / L, l = row % L;
    for (int64_t d0 = 0; d0 < Dm; d0 += kLanes) {
      const int64_t nd = std::min(kLanes, Dm - d0);
      // Per-block constants; lanes past D are zero and stay inert (u = 0 keeps h = 0).
      for (int64_t j = 0; j < kLanes; ++j) {
        const bool live = j < nd;
        dv[j] = live && Dskip ? Dskip[d0 + j] : acc_t(0);
        bv[j] = live && bias ? bias[d0 + j] : acc_t(0);
        zz[j] = acc_t(0);
        for (int64_t n = 0; n < N; ++n) {
          a_t[n * kLanes + j] = live ? A[(d0 + j) * N + n] : acc_t(0);
          h[n * kLanes + j] = live && h0 ? h0[(row * Dm + d0 + j) * N + n] : acc_t(0);
        }
      }
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = time_index(s, T, p.reverse);
        const int64_t loc = (b * T + t) * L + l;  // (b, t, l)
        const int64_t off = loc * Dm + d0;
        for (int64_t n = 0; n < N; ++n) {
          bn[n] = static_cast<acc_t>(B[loc * N + n]);
          cn[n] = static_cast<acc_t>(C[loc * N + n]);
        }
        load_lanes(u + off, nd, uu);
        load_lanes(delta + off, nd, pre);
        if (z) load_lanes(z + off, nd, zz);
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          dt[j] = step_size<acc_t>(pre[j] + bv[j], softplus);
          dtu[j] = dt[j] * uu[j];
          acc[j] = dv[j] * uu[j];
        }
        for (int64_t n = 0; n < N; ++n) {
          acc_t* hn = h + n * kLanes;
          update(hn, hn, nullptr, a_t + n * kLanes, dt, dtu, bn[n], acc, cn[n]);
        }
        if (z) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[j] *= zz[j] * sigmoid<acc_t>(zz[j]);
        }
        store_lanes(acc, nd, y + off);
      }
      for (int64_t j = 0; j < nd; ++j)
        for (int64_t n = 0; n < N; ++n) last[(row * Dm + d0 + j) * N + n] = h[n * kLanes + j];
    }
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
