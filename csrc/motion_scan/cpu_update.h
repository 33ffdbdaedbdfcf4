// The CPU kernels' innermost operation: one scan step for a block of kLanes channels,
//   h_new[n] = exp(dt * a[n]) * h_prev[n] + dtu * b[n],   acc += c[n] * h_new[n],
// over the N states. It is where the scan spends its time (one exp per state per step), so it
// has an AVX-512 version beside the portable one. Both use the exponential of motion_scan.h
// (Cody-Waite reduction, the same polynomial); the AVX-512 one applies the final 2^k with
// vscalefps, which also handles overflow, underflow and NaN in hardware and halves the
// instruction count. Both compute the same approximation and agree to about an ulp.
#pragma once

#include <cstdlib>

#include "cpu_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PKS4_HAVE_AVX512_UPDATE 1
#endif

namespace pks4 {
namespace cpu {

// One scan step for a block of kLanes channels and all N states, states laid out (N, kLanes):
//   hn[n] = exp(dt * a[n]) * hp[n] + dtu * bn[n],   acc += cn[n] * hn[n]   for n < N.
// hn may alias hp; decay_out (the N decays, for the backward) and cn may be null. dt, dtu and
// acc are read once per step, not once per state: the AVX-512 version keeps them in registers.
template <typename acc_t>
using StepFn = void (*)(const acc_t* hp, acc_t* hn, acc_t* decay_out, const acc_t* a,
                        const acc_t* dt, const acc_t* dtu, const acc_t* bn, const acc_t* cn,
                        acc_t* acc, int64_t N);

template <typename acc_t>
void step_lanes_portable(const acc_t* hp, acc_t* hn, acc_t* decay_out, const acc_t* a,
                         const acc_t* dt, const acc_t* dtu, const acc_t* bn, const acc_t* cn,
                         acc_t* acc, int64_t N) {
  alignas(64) acc_t h[kLanes], dec[kLanes];
  for (int64_t n = 0; n < N; ++n) {
    const int64_t at = n * kLanes;
    const acc_t b = bn[n];
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      h[j] = hp[at + j];
      dec[j] = update_state<acc_t>(h[j], dt[j], a[at + j], dtu[j], b);
    }
    for (int64_t j = 0; j < kLanes; ++j) hn[at + j] = h[j];
    if (decay_out)
      for (int64_t j = 0; j < kLanes; ++j) decay_out[at + j] = dec[j];
    if (cn) {
      const acc_t c = cn[n];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += c * h[j];
    }
  }
}

// One step of the backward walk for a block of kLanes channels, t from last to first, states
// (N, kLanes) as in the forward; gh holds dL/dh_t on entry and dL/dh_{t-1} on return:
//   lane_C[n] += gy * h_t[n]                       (dL/dC_t, still per lane)
//   g = gh[n] + gy * c[n],  x = g * h_{t-1}[n] * decay[n]
//   gA[n] += x * dt,  gdt += x * a[n],  gwrite += g * b[n]
//   lane_B[n] += g * dtu,  gh[n] = g * decay[n]
// gdt (dL/d dt through the decays) and gwrite (dL/d(dt u) / through B) are written, not added.
template <typename acc_t>
using WalkFn = void (*)(const acc_t* hp, const acc_t* hn, const acc_t* decay, const acc_t* a,
                        const acc_t* gy, const acc_t* dt, const acc_t* dtu, const acc_t* bn,
                        const acc_t* cn, acc_t* gh, acc_t* gA, acc_t* lane_B, acc_t* lane_C,
                        acc_t* gdt, acc_t* gwrite, int64_t N);

template <typename acc_t>
void walk_lanes_portable(const acc_t* hp, const acc_t* hn, const acc_t* decay, const acc_t* a,
                         const acc_t* gy, const acc_t* dt, const acc_t* dtu, const acc_t* bn,
                         const acc_t* cn, acc_t* gh, acc_t* gA, acc_t* lane_B, acc_t* lane_C,
                         acc_t* gdt, acc_t* gwrite, int64_t N) {
  alignas(64) acc_t sum_dt[kLanes] = {}, sum_write[kLanes] = {};
  for (int64_t n = 0; n < N; ++n) {
    const int64_t at = n * kLanes;
    const acc_t b = bn[n], c = cn[n];
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      lane_C[at + j] += gy[j] * hn[at + j];
      const acc_t g = gh[at + j] + gy[j] * c;
      const acc_t x = g * hp[at + j] * decay[at + j];
      gA[at + j] += x * dt[j];
      sum_dt[j] += x * a[at + j];
      sum_write[j] += g * b;
      lane_B[at + j] += g * dtu[j];
      gh[at + j] = g * decay[at + j];
    }
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    gdt[j] = sum_dt[j];
    gwrite[j] = sum_write[j];
  }
}

#ifdef PKS4_HAVE_AVX512_UPDATE
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  // exp_f32 of motion_scan.h with k rounded in hardware and 2^k applied by vscalefps.
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 er =
      _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(er, k);
}

// kLanes = 32 channels are two registers: dt, dt*u and the read-out stay in registers over
// the N states, and the two exponentials of a state are independent work for the core.
__attribute__((target("avx512f"))) inline void step_lanes_avx512(
    const float* hp, float* hn, float* decay_out, const float* a, const float* dt,
    const float* dtu, const float* bn, const float* cn, float* acc, int64_t N) {
  static_assert(kLanes == 32, "the AVX-512 step holds kLanes = 32 floats in two registers");
  const __m512 dt0 = _mm512_loadu_ps(dt), dt1 = _mm512_loadu_ps(dt + 16);
  const __m512 dtu0 = _mm512_loadu_ps(dtu), dtu1 = _mm512_loadu_ps(dtu + 16);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t at = n * kLanes;
    const __m512 dec0 = exp_avx512(_mm512_mul_ps(dt0, _mm512_loadu_ps(a + at)));
    const __m512 dec1 = exp_avx512(_mm512_mul_ps(dt1, _mm512_loadu_ps(a + at + 16)));
    const __m512 bv = _mm512_set1_ps(bn[n]);
    const __m512 h0 = _mm512_fmadd_ps(dec0, _mm512_loadu_ps(hp + at), _mm512_mul_ps(dtu0, bv));
    const __m512 h1 =
        _mm512_fmadd_ps(dec1, _mm512_loadu_ps(hp + at + 16), _mm512_mul_ps(dtu1, bv));
    _mm512_storeu_ps(hn + at, h0);
    _mm512_storeu_ps(hn + at + 16, h1);
    if (decay_out) {
      _mm512_storeu_ps(decay_out + at, dec0);
      _mm512_storeu_ps(decay_out + at + 16, dec1);
    }
    if (cn) {
      const __m512 cv = _mm512_set1_ps(cn[n]);
      acc0 = _mm512_fmadd_ps(cv, h0, acc0);
      acc1 = _mm512_fmadd_ps(cv, h1, acc1);
    }
  }
  if (cn) {
    _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), acc0));
    _mm512_storeu_ps(acc + 16, _mm512_add_ps(_mm512_loadu_ps(acc + 16), acc1));
  }
}
__attribute__((target("avx512f"))) inline void walk_lanes_avx512(
    const float* hp, const float* hn, const float* decay, const float* a, const float* gy,
    const float* dt, const float* dtu, const float* bn, const float* cn, float* gh, float* gA,
    float* lane_B, float* lane_C, float* gdt, float* gwrite, int64_t N) {
  __m512 gy_v[2], dt_v[2], dtu_v[2], sum_dt[2], sum_write[2];
  for (int q = 0; q < 2; ++q) {
    gy_v[q] = _mm512_loadu_ps(gy + 16 * q);
    dt_v[q] = _mm512_loadu_ps(dt + 16 * q);
    dtu_v[q] = _mm512_loadu_ps(dtu + 16 * q);
    sum_dt[q] = sum_write[q] = _mm512_setzero_ps();
  }
  for (int64_t n = 0; n < N; ++n) {
    const __m512 bv = _mm512_set1_ps(bn[n]), cv = _mm512_set1_ps(cn[n]);
    for (int q = 0; q < 2; ++q) {
      const int64_t at = n * kLanes + 16 * q;
      const __m512 dec = _mm512_loadu_ps(decay + at);
      _mm512_storeu_ps(lane_C + at,
                       _mm512_fmadd_ps(gy_v[q], _mm512_loadu_ps(hn + at), _mm512_loadu_ps(lane_C + at)));
      const __m512 g = _mm512_fmadd_ps(gy_v[q], cv, _mm512_loadu_ps(gh + at));
      const __m512 x = _mm512_mul_ps(_mm512_mul_ps(g, _mm512_loadu_ps(hp + at)), dec);
      _mm512_storeu_ps(gA + at, _mm512_fmadd_ps(x, dt_v[q], _mm512_loadu_ps(gA + at)));
      sum_dt[q] = _mm512_fmadd_ps(x, _mm512_loadu_ps(a + at), sum_dt[q]);
      sum_write[q] = _mm512_fmadd_ps(g, bv, sum_write[q]);
      _mm512_storeu_ps(lane_B + at, _mm512_fmadd_ps(g, dtu_v[q], _mm512_loadu_ps(lane_B + at)));
      _mm512_storeu_ps(gh + at, _mm512_mul_ps(g, dec));
    }
  }
  for (int q = 0; q < 2; ++q) {
    _mm512_storeu_ps(gdt + 16 * q, sum_dt[q]);
    _mm512_storeu_ps(gwrite + 16 * q, sum_write[q]);
  }
}
#endif

// The step for this CPU: the AVX-512 one for float where the processor has it, unless
// PKS4_CPU_NO_AVX512=1 asks for the portable one (read once per process).
template <typename acc_t>
inline StepFn<acc_t> pick_step() {
  return &step_lanes_portable<acc_t>;
}

template <>
inline StepFn<float> pick_step<float>() {
#ifdef PKS4_HAVE_AVX512_UPDATE
  static const StepFn<float> chosen = [] {
    const char* off = std::getenv("PKS4_CPU_NO_AVX512");
    const bool allowed = !(off && off[0] == '1');
    return allowed && __builtin_cpu_supports("avx512f") ? &step_lanes_avx512
                                                        : &step_lanes_portable<float>;
  }();
  return chosen;
#else
  return &step_lanes_portable<float>;
#endif
}

template <typename acc_t>
inline WalkFn<acc_t> pick_walk() {
  return &walk_lanes_portable<acc_t>;
}

template <>
inline WalkFn<float> pick_walk<float>() {
#ifdef PKS4_HAVE_AVX512_UPDATE
  return pick_step<float>() == &step_lanes_avx512 ? &walk_lanes_avx512
                                                  : &walk_lanes_portable<float>;
#else
  return &walk_lanes_portable<float>;
#endif
}

}  // namespace cpu
}  // namespace pks4
