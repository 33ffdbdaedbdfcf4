// Host emulation of <cuda_fp16.h>: the __half storage type and its explicit conversions.
//
// __half is a bare 16-bit pattern with no implicit conversion or arithmetic, as the kernels see it
// under torch's build flags (__CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_HALF_OPERATORS__): code that
// relied on an implicit conversion would not compile here either.
#pragma once

#include "pks4emu/float_bits.h"

struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) { return ::pks4emu::half_bits_to_float(h.__x); }

// Round to nearest even; overflow gives infinity, NaN stays NaN.
inline __half __float2half_rn(float f) { return __half{::pks4emu::float_to_half_bits(f)}; }
