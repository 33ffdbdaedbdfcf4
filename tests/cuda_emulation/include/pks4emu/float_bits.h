// Bit-exact conversions between float and the 16-bit floating formats, with integer arithmetic
// only: the emulated __half / __nv_bfloat16 intrinsics must round exactly as the GPU does (round
// to nearest even), whatever the host's floating-point environment.
#pragma once

#include <cstdint>
#include <cstring>

namespace pks4emu {

inline uint32_t float_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}

inline float bits_float(uint32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

// Rounds `value`, whose `shift` low bits are dropped, to nearest even; the carry of a round-up
// propagates into the bits above (mantissa into exponent, largest finite into infinity).
inline uint32_t round_shift_even(uint32_t value, int shift) {
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

inline unsigned short float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);  // NaN: quiet NaN
  if (a >= 0x47800000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 2^16: inf
  if (a <= 0x33000000u) return static_cast<unsigned short>(sign);  // <= 2^-25: rounds to zero
  const int e = static_cast<int>(a >> 23);  // biased; a is a normal float here
  uint32_t r;
  if (e < 113) {
    // Below 2^-14: a subnormal half, in units of 2^-24. The value is m * 2^(e - 150).
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    r = round_shift_even(m, 126 - e);
  } else {
    // Exponent and mantissa side by side: rounding up carries into the exponent.
    r = round_shift_even(((static_cast<uint32_t>(e) - 112u) << 23) | (a & 0x7fffffu), 13);
  }
  return static_cast<unsigned short>(sign | r);
}

inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));  // inf, NaN (payload kept)
  if (e != 0) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return bits_float(sign);
  // Subnormal m * 2^-24: normalise.
  uint32_t exp = 113;
  while (!(m & 0x400u)) {
    m <<= 1;
    --exp;
  }
  return bits_float(sign | (exp << 23) | ((m & 0x3ffu) << 13));
}

inline unsigned short float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<unsigned short>((x >> 16) | 0x40u);  // NaN: quiet, sign and payload kept
  }
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(unsigned short h) {
  return bits_float(static_cast<uint32_t>(h) << 16);
}

}  // namespace pks4emu
