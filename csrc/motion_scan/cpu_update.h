// The CPU kernels' innermost operation: one state update for a block of kLanes channels,
//   h_new = exp(dt * a) * h_prev + dtu * b,   acc += c * h_new,
// for one state n. It is where the scan spends its time (one exp per state per step), so it
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

// hp: previous states, hn: new states (may alias hp), decay_out: optional, acc: optional.
template <typename acc_t>
using UpdateFn = void (*)(const acc_t* hp, acc_t* hn, acc_t* decay_out, const acc_t* a,
                          const acc_t* dt, const acc_t* dtu, acc_t b, acc_t* acc, acc_t c);

template <typename acc_t>
void update_lanes_portable(const acc_t* hp, acc_t* hn, acc_t* decay_out, const acc_t* a,
                           const acc_t* dt, const acc_t* dtu, acc_t b, acc_t* acc, acc_t c) {
  alignas(64) acc_t h[kLanes], dec[kLanes];
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    h[j] = hp[j];
    dec[j] = update_state<acc_t>(h[j], dt[j], a[j], dtu[j], b);
  }
  for (int64_t j = 0; j < kLanes; ++j) hn[j] = h[j];
  if (decay_out)
    for (int64_t j = 0; j < kLanes; ++j) decay_out[j] = dec[j];
  if (acc) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += c * h[j];
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

__attribute__((target("avx512f"))) inline void update_lanes_avx512(
    const float* hp, float* hn, float* decay_out, const float* a, const float* dt,
    const float* dtu, float b, float* acc, float c) {
  static_assert(kLanes % 16 == 0, "kLanes must be a multiple of the AVX-512 width");
  const __m512 bv = _mm512_set1_ps(b), cv = _mm512_set1_ps(c);
  for (int64_t q = 0; q < kLanes; q += 16) {
    const __m512 dec = exp_avx512(_mm512_mul_ps(_mm512_loadu_ps(dt + q), _mm512_loadu_ps(a + q)));
    const __m512 h = _mm512_fmadd_ps(dec, _mm512_loadu_ps(hp + q),
                                     _mm512_mul_ps(_mm512_loadu_ps(dtu + q), bv));
    _mm512_storeu_ps(hn + q, h);
    if (decay_out) _mm512_storeu_ps(decay_out + q, dec);
    if (acc) _mm512_storeu_ps(acc + q, _mm512_fmadd_ps(cv, h, _mm512_loadu_ps(acc + q)));
  }
}
#endif

// The update for this CPU: the AVX-512 one for float where the processor has it, unless
// PKS4_CPU_NO_AVX512=1 asks for the portable one (read once per process).
template <typename acc_t>
inline UpdateFn<acc_t> pick_update() {
  return &update_lanes_portable<acc_t>;
}

template <>
inline UpdateFn<float> pick_update<float>() {
#ifdef PKS4_HAVE_AVX512_UPDATE
  static const UpdateFn<float> chosen = [] {
    const char* off = std::getenv("PKS4_CPU_NO_AVX512");
    const bool allowed = !(off && off[0] == '1');
    return allowed && __builtin_cpu_supports("avx512f") ? &update_lanes_avx512
                                                        : &update_lanes_portable<float>;
  }();
  return chosen;
#else
  return &update_lanes_portable<float>;
#endif
}

}  // namespace cpu
}  // namespace pks4
