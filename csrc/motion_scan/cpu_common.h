// Helpers shared by the CPU forward and backward kernels: element types and dispatch.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "motion_scan.h"

namespace pks4 {
namespace cpu {

// The row kernels are compiled for AVX-512, AVX2+FMA and baseline x86-64, and the loader
// picks the best the CPU supports at run time: a shipped binary is fast everywhere without
// -march=native.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#if __GNUC__ >= 11
#define PKS4_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PKS4_CPU_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#endif
#else
#define PKS4_CPU_CLONES
#endif

// Channels processed together by one vector loop (two AVX-512 or four AVX2 registers of
// floats: independent work for the out-of-order core while the exp polynomials of one register
// are in flight); the N states of these channels live in a small (N, kLanes) array.
constexpr int64_t kLanes = 32;

// Reads `count` <= kLanes elements into `out` as the compute type, zero-filling the rest, so
// the vector loops always run over all kLanes lanes.
template <typename src_t, typename acc_t>
inline void load_lanes(const src_t* src, int64_t count, acc_t* out) {
  if (count == kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) out[j] = static_cast<acc_t>(src[j]);
  } else {
    for (int64_t j = 0; j < kLanes; ++j) out[j] = j < count ? static_cast<acc_t>(src[j]) : acc_t(0);
  }
}

template <typename acc_t>
inline void copy_lanes(const acc_t* src, acc_t* dst) {
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) dst[j] = src[j];
}

// Asks for the cache lines of kLanes elements starting at `src` (a hint; never faults).
template <typename src_t>
inline void prefetch_lanes(const src_t* src) {
  const char* p = reinterpret_cast<const char*>(src);
  for (int64_t byte = 0; byte < kLanes * static_cast<int64_t>(sizeof(src_t)); byte += 64)
    __builtin_prefetch(p + byte);
}

template <typename dst_t>
inline void prefetch_lanes_for_write(dst_t* dst) {
  char* p = reinterpret_cast<char*>(dst);
  for (int64_t byte = 0; byte < kLanes * static_cast<int64_t>(sizeof(dst_t)); byte += 64)
    __builtin_prefetch(p + byte, 1);
}

template <typename acc_t, typename dst_t>
inline void store_lanes(const acc_t* in, int64_t count, dst_t* dst) {
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<dst_t>(in[j]);
}

// A (D, N) rearranged per block of kLanes channels into the (N, kLanes) layout of the states,
// zero past D: the state loops then read it contiguously. Built once per task.
template <typename acc_t>
std::vector<acc_t> blocked_decay_rates(const acc_t* A, int64_t D, int64_t N) {
  const int64_t blocks = (D + kLanes - 1) / kLanes;
  std::vector<acc_t> out(blocks * N * kLanes, acc_t(0));
  for (int64_t d = 0; d < D; ++d)
    for (int64_t n = 0; n < N; ++n) out[((d / kLanes) * N + n) * kLanes + d % kLanes] = A[d * N + n];
  return out;
}

// D and delta_bias of channels [d0, d0 + nd) into lanes, zero where absent or past D.
template <typename acc_t>
inline void load_channel_constants(const acc_t* Dskip, const acc_t* bias, int64_t d0, int64_t nd,
                                   acc_t* dv, acc_t* bv) {
  for (int64_t j = 0; j < kLanes; ++j) {
    const bool live = j < nd;
    dv[j] = live && Dskip ? Dskip[d0 + j] : acc_t(0);
    bv[j] = live && bias ? bias[d0 + j] : acc_t(0);
  }
}

// Row `row`'s states of channels [d0, d0 + nd) from a (rows, D, N) tensor into the (N, kLanes)
// block `h`; zeros where `src` is null (no initial state) and past D.
template <typename acc_t>
inline void load_block_states(const acc_t* src, int64_t row, int64_t D, int64_t N, int64_t d0,
                              int64_t nd, acc_t* h) {
  std::fill(h, h + N * kLanes, acc_t(0));
  if (!src) return;
  for (int64_t j = 0; j < nd; ++j)
    for (int64_t n = 0; n < N; ++n) h[n * kLanes + j] = src[(row * D + d0 + j) * N + n];
}

// The inverse of load_block_states, for the nd live lanes.
template <typename acc_t>
inline void store_block_states(const acc_t* h, int64_t row, int64_t D, int64_t N, int64_t d0,
                               int64_t nd, acc_t* dst) {
  acc_t* out = dst + (row * D + d0) * N;
  for (int64_t j = 0; j < nd; ++j)
    for (int64_t n = 0; n < N; ++n) out[j * N + n] = h[n * kLanes + j];
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<input_t>, Tag<bc_t>, Tag<acc_t>) for the params' storage kinds.
template <typename F>
void dispatch_kinds(const MotionScanParams& p, F&& f) {
  const bool bc_same = p.bc_kind == p.input_kind;
  switch (p.input_kind) {
    case ScalarKind::Float32:
      if (p.bc_kind == ScalarKind::Float32) return f(Tag<float>{}, Tag<float>{}, Tag<float>{});
      break;
    case ScalarKind::Float64:
      if (bc_same) return f(Tag<double>{}, Tag<double>{}, Tag<double>{});
      break;
    case ScalarKind::Float16:
      if (bc_same) return f(Tag<c10::Half>{}, Tag<c10::Half>{}, Tag<float>{});
      if (p.bc_kind == ScalarKind::Float32)
        return f(Tag<c10::Half>{}, Tag<float>{}, Tag<float>{});
      break;
    case ScalarKind::BFloat16:
      if (bc_same) return f(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{}, Tag<float>{});
      if (p.bc_kind == ScalarKind::Float32)
        return f(Tag<c10::BFloat16>{}, Tag<float>{}, Tag<float>{});
      break;
  }
  throw std::invalid_argument("motion_scan: unsupported combination of input and B/C dtypes");
}

// Runs rows(Tag<input_t>{}, Tag<bc_t>{}, Tag<acc_t>{}, begin, end) over all (batch, location)
// rows on ATen's thread pool: each row is independent work of T * D * N state updates.
template <typename F>
void parallel_rows(const MotionScanParams& p, F&& rows) {
  dispatch_kinds(p, [&](auto in_tag, auto bc_tag, auto acc_tag) {
    at::parallel_for(0, p.batch * p.nloc, 1, [&](int64_t begin, int64_t end) {
      rows(in_tag, bc_tag, acc_tag, begin, end);
    });
  });
}

}  // namespace cpu
}  // namespace pks4
