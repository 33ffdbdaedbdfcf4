// Host emulation of the part of the CUDA runtime API that the kernels' host code and the bindings
// use: launch geometry types, streams and the launch error state.
//
// Found before the toolkit's header (its folder comes first on the include path), so that the
// kernel sources compile with a host compiler. The functions have C++ linkage, unlike the real
// runtime's: the process may also hold the real libcudart (torch links it), and the two must not
// resolve to each other.
#pragma once

#include <cstddef>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as in CUDA
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

typedef struct CUstream_st* cudaStream_t;

// The codes of the real runtime, for the errors a launch can report.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};

// The error of the last launch, reset by the call (as in CUDA).
cudaError_t cudaGetLastError();
// The same, without resetting it.
cudaError_t cudaPeekAtLastError();
// The runtime's text for `err`, followed by what the emulation found wrong with the launch.
const char* cudaGetErrorString(cudaError_t err);
