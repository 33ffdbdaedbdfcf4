// Kernels that check the emulation itself: that the warp intrinsics exchange the values CUDA
// defines, that shared memory is poisoned between blocks, and that the misuses the emulation
// promises to catch (divergent barriers, lanes missing from a shuffle, bad launch
// configurations...) do raise. Run one by name with run_selftest(); a failure is an exception.
#include <cuda_runtime.h>

#include <cmath>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace pks4emu {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kShuffleResults = 13;

// 80 threads: two full warps and a warp of 16, whose lanes use the mask 0xffff and width 16.
__global__ void shuffle_kernel(int* out) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid % warpSize;
  const bool partial = tid >= 64;
  const unsigned mask = partial ? 0xffffu : kFull;
  const int w = partial ? 16 : 32;
  const int v = tid * 10;
  int* o = out + tid * kShuffleResults;
  o[0] = __shfl_xor_sync(mask, v, 1);
  o[1] = __shfl_xor_sync(mask, v, 8);
  o[2] = __shfl_sync(mask, v, 3, w);
  o[3] = __shfl_down_sync(mask, v, 2, w);
  o[4] = __shfl_up_sync(mask, v, 5, w);
  o[5] = __shfl_xor_sync(mask, v, 4, 8);
  o[6] = __shfl_sync(mask, v, lane + 1, 8);
  o[7] = static_cast<int>(__ballot_sync(mask, lane % 3 == 0));
  o[8] = __any_sync(mask, lane == 5);
  o[9] = __all_sync(mask, lane < 40);
  o[10] = __all_sync(mask, lane != 7);
  o[11] = static_cast<int>(__shfl_xor_sync(mask, tid + 0.5f, 2) * 2.0f);
  __syncwarp(mask);
  // Width 16: lanes 16-31 read the earlier segment, lanes 0-15 would read a later one and get
  // their own value.
  o[12] = __shfl_xor_sync(mask, v, 16, 16);
}

void check_shuffles() {
  constexpr int kThreads = 80;
  std::vector<int> out(kThreads * kShuffleResults, -1);
  PKS4_LAUNCH_KERNEL(shuffle_kernel, 1, kThreads, 0, nullptr, out.data());
  for (int tid = 0; tid < kThreads; ++tid) {
    const int lane = tid % 32, base = tid - lane;
    const bool partial = tid >= 64;
    const int w = partial ? 16 : 32, seg = lane / w * w;
    const unsigned mask = partial ? 0xffffu : kFull;
    unsigned ballot = 0;
    for (int k = 0; k < 32; ++k)
      if ((mask >> k & 1u) && k % 3 == 0) ballot |= 1u << k;
    auto value = [&](int src_lane) { return (base + src_lane) * 10; };
    const int expected[kShuffleResults] = {
        value(lane ^ 1),
        value(lane ^ 8),
        value(seg + 3),
        value(lane - seg + 2 < w ? lane + 2 : lane),
        value(lane - seg >= 5 ? lane - 5 : lane),
        value(lane ^ 4),
        value(lane / 8 * 8 + (lane + 1) % 8),
        static_cast<int>(ballot),
        1,
        1,
        0,
        2 * (base + (lane ^ 2)) + 1,
        value(lane >= 16 ? lane - 16 : lane),
    };
    for (int r = 0; r < kShuffleResults; ++r) {
      if (out[tid * kShuffleResults + r] != expected[r])
        throw std::runtime_error("shuffle result " + std::to_string(r) + " of thread " +
                                 std::to_string(tid) + ": expected " +
                                 std::to_string(expected[r]) + ", got " +
                                 std::to_string(out[tid * kShuffleResults + r]));
    }
  }
}

// Reads shared memory before any thread of the block writes it: poisoned (NaN) in every block,
// whatever the previous block left there. A template, as the scan kernels are.
template <int kSize>
__global__ void shared_kernel(float* out) {
  __shared__ float tile[kSize];
  const unsigned t = threadIdx.x;
  out[blockIdx.x * 64 + t] = tile[t];
  __syncthreads();
  tile[t] = 1.0f;
  __syncthreads();
}

void check_shared_poisoned() {
  std::vector<float> out(3 * 64, 0.0f);
  PKS4_LAUNCH_KERNEL(shared_kernel<64>, 3, 64, 0, nullptr, out.data());
  for (size_t i = 0; i < out.size(); ++i)
    if (!std::isnan(out[i]))
      throw std::runtime_error("unwritten shared memory read " + std::to_string(out[i]) +
                               " (element " + std::to_string(i) + "), expected NaN");
}

__global__ void divergent_barrier_kernel(int* /*unused*/) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_exit_kernel(int* /*unused*/) {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

__global__ void half_warp_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void mask_mismatch_kernel(int* out) {
  const unsigned lane = threadIdx.x % 32;
  out[threadIdx.x] = __shfl_xor_sync(lane < 16 ? kFull : 0xffff0000u, 1, 1);
}

__global__ void lane_outside_own_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(threadIdx.x == 5 ? 0x1u : kFull, 1, 1);
}

__global__ void read_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffu, 1, 20);
}

// The bound is registered by hand here; the builder extracts those of the .cu files.
__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }
PKS4EMU_REGISTER_LAUNCH_BOUNDS(bounded_kernel, 64)

// Launches `kernel` over `grid` x `block` on a scratch buffer; raises what cudaGetLastError()
// reports, as the bindings do after a launch.
void launch(void (*kernel)(int*), dim3 grid, dim3 block, const char* name) {
  std::vector<int> out(1024, 0);
  ::pks4emu::launch_kernel(name, kernel, grid, block, 0, nullptr, out.data());
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("launch failed: ") + cudaGetErrorString(err));
}

}  // namespace

void run_selftest(const std::string& name) {
  const std::map<std::string, std::function<void()>> tests = {
      {"shuffles", check_shuffles},
      {"shared_poisoned", check_shared_poisoned},
      {"divergent_barrier", [] { launch(divergent_barrier_kernel, 1, 64, "divergent"); }},
      {"early_exit", [] { launch(early_exit_kernel, 1, 64, "early_exit"); }},
      {"half_warp_shuffle", [] { launch(half_warp_shuffle_kernel, 1, 64, "half_warp"); }},
      {"mask_mismatch", [] { launch(mask_mismatch_kernel, 1, 32, "mask_mismatch"); }},
      {"lane_outside_own_mask", [] { launch(lane_outside_own_mask_kernel, 1, 32, "own_mask"); }},
      {"read_outside_mask", [] { launch(read_outside_mask_kernel, 1, 32, "read_outside"); }},
      {"block_too_large", [] { launch(bounded_kernel, 1, 2048, "block_too_large"); }},
      {"grid_too_large", [] { launch(bounded_kernel, dim3(1, 65536), 32, "grid_too_large"); }},
      {"launch_bounds", [] { launch(bounded_kernel, 1, 128, "bounded_kernel"); }},
      {"within_launch_bounds", [] { launch(bounded_kernel, dim3(2, 2), 64, "bounded_kernel"); }},
  };
  const auto it = tests.find(name);
  if (it == tests.end()) throw std::invalid_argument("no emulation self-test named " + name);
  it->second();
}

}  // namespace pks4emu
