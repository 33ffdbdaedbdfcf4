// Host emulation of the CUDA execution model, enough to run the motion_scan kernels' own source
// with a host compiler and check what they compute.
//
// * A launch runs its blocks one after the other. The threads of a block are cooperative fibers
//   on the calling thread: a fiber runs until it blocks (at __syncthreads or in a warp
//   intrinsic) or exits, then the next runnable fiber in thread order runs. A thread that runs
//   ahead of a missing barrier therefore really overwrites, or reads before it is written,
//   what the other threads of its block use: the race shows in the results.
// * __shared__ variables are static thread_local storage: shared by the fibers of the running
//   block (they all run on the launching host thread), and filled with 0xff bytes (NaN as float)
//   before every block: a read of shared memory that no thread of the block has written shows as
//   NaN. (thread_local, because the runtime can find and poison this library's thread-local
//   block as a whole; a section attribute, the other way to group them, is dropped by GCC for
//   static locals of function templates, which is what the kernels' shared arrays are.)
// * __syncthreads is a barrier of all the block's threads at one call site. Threads that reach
//   different barriers, a thread that exits while others wait, and a block where no thread can
//   continue are errors (C++ exceptions out of the launch), never a hang.
// * Warp intrinsics wait until every lane named by the mask has arrived with the same operation
//   and mask, then exchange the values. A caller outside its mask, a mask naming a lane that
//   waits elsewhere or has exited, a mismatch of mask or operation, and a read from a lane
//   outside the mask are errors.
// * Launch configurations beyond CUDA's limits (or the kernel's __launch_bounds__) do not run
//   and set the error cudaGetLastError() returns, as the real runtime does.
//
// Not emulated: dynamic (extern) shared memory, atomics, memory fences between blocks (blocks
// never run concurrently here), and timing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../cuda_runtime_api.h"

// Execution-space keywords: host code here. Kernels stay in their (anonymous) namespace.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// The bound is read from the source by the builder and registered for the launcher, see
// PKS4EMU_REGISTER_LAUNCH_BOUNDS; the attribute itself means nothing to a host compiler.
#define __launch_bounds__(...)
// Static storage of the launching thread, see the header comment. The library must hold no
// other thread_local variable: the runtime poisons all of its thread-local storage.
#define __shared__ static thread_local

namespace pks4emu {

// The built-in variables of the running thread and block.
struct ThreadState {
  uint3 thread_idx;
};
struct BlockState {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

namespace detail {
extern ThreadState* current_thread;  // the fiber that runs now
extern BlockState current_block;

// Operations that synchronise a warp (the lanes named by their mask).
enum class WarpOp : int { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };

// Waits for the lanes of `mask` and returns what this lane receives (see device.h's header).
uint64_t warp_sync(WarpOp op, unsigned mask, uint64_t value, int param, int width,
                   const char* file, int line);
void block_barrier(const char* file, int line);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(uint64_t),
                "warp shuffles exchange values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Runs `body` as every thread of every block of the grid, after checking the configuration.
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body);

// The largest block a kernel's __launch_bounds__ allows, by kernel name.
void register_launch_bounds(const char* kernel, long long max_threads);
constexpr long long first_arg(long long v) { return v; }
template <typename... Rest>
constexpr long long first_arg(long long v, Rest...) {
  return v;
}
struct LaunchBoundsRegistration {
  LaunchBoundsRegistration(const char* kernel, long long max_threads) {
    register_launch_bounds(kernel, max_threads);
  }
};
}  // namespace detail

// The <<<grid, block, shared, stream>>> launch: the arguments are converted to the kernel's
// parameter types and copied once, as CUDA does, then every thread calls the kernel on them.
template <typename... Params, typename... Args>
void launch_kernel(const char* kernel_expr, void (*kernel)(Params...), dim3 grid, dim3 block,
                   size_t shared_bytes, cudaStream_t /*stream: one queue here*/,
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong arity");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  detail::run_grid(kernel_expr, grid, block, shared_bytes,
                   [&]() { std::apply(kernel, params); });
}

}  // namespace pks4emu

// Registers the __launch_bounds__ of `kernel` (maxThreadsPerBlock first, as in CUDA) at load
// time; expanded from the list the builder extracts from each .cu file.
#define PKS4EMU_REGISTER_LAUNCH_BOUNDS(kernel, ...)                                   \
  static const ::pks4emu::detail::LaunchBoundsRegistration pks4emu_bounds_##kernel( \
      #kernel, ::pks4emu::detail::first_arg(__VA_ARGS__));

#define PKS4_LAUNCH_KERNEL(kernel, grid, block, smem, stream, ...) \
  ::pks4emu::launch_kernel(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__)

// Built-in variables of the running thread (read-only).
#define threadIdx (static_cast<const uint3&>(::pks4emu::detail::current_thread->thread_idx))
#define blockIdx (static_cast<const uint3&>(::pks4emu::detail::current_block.block_idx))
#define blockDim (static_cast<const dim3&>(::pks4emu::detail::current_block.block_dim))
#define gridDim (static_cast<const dim3&>(::pks4emu::detail::current_block.grid_dim))
constexpr int warpSize = 32;

// Intrinsics. The call site (file, line) names the barrier or exchange in error messages and
// tells barriers apart.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::pks4emu::detail::block_barrier(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::pks4emu::detail::warp_sync(::pks4emu::detail::WarpOp::SyncWarp, mask, 0, 0, warpSize, file,
                               line);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return from_bits<T>(warp_sync(WarpOp::Shfl, mask, to_bits(var), src_lane, width, file, line));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return from_bits<T>(warp_sync(WarpOp::ShflUp, mask, to_bits(var), static_cast<int>(delta),
                                width, file, line));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return from_bits<T>(warp_sync(WarpOp::ShflDown, mask, to_bits(var), static_cast<int>(delta),
                                width, file, line));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return from_bits<T>(
      warp_sync(WarpOp::ShflXor, mask, to_bits(var), lane_mask, width, file, line));
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return static_cast<unsigned>(
      warp_sync(WarpOp::Ballot, mask, predicate != 0, 0, warpSize, file, line));
}

inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return static_cast<int>(warp_sync(WarpOp::Any, mask, predicate != 0, 0, warpSize, file, line));
}

inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  using namespace ::pks4emu::detail;
  return static_cast<int>(warp_sync(WarpOp::All, mask, predicate != 0, 0, warpSize, file, line));
}
