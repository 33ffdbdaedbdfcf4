// Host emulation of <cuda_bf16.h>: the __nv_bfloat16 storage type and its explicit conversions
// (a bare 16-bit pattern, see cuda_fp16.h for why).
#pragma once

#include "pks4emu/float_bits.h"

struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 h) { return ::pks4emu::bfloat16_bits_to_float(h.__x); }

// Round to nearest even; NaN stays NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{::pks4emu::float_to_bfloat16_bits(f)};
}
