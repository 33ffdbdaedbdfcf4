// The emulated CUDA runtime: launch checks, the block scheduler (threads as fibers), barriers,
// the warp intrinsics and the launch error state. See include/pks4emu/device.h for the model;
// here is how it is carried out.
//
// Scheduling: the fibers of a block run one at a time, each until it blocks or exits; a blocking
// fiber switches straight to the next runnable one in thread order (cyclically), and back to the
// launcher only when none is left: the block is then finished, failed, or stuck (an error).
// Every error is raised as soon as it is certain (a thread reaching another barrier, a lane
// waiting for one that exited...), inside the fiber that sees it; the launcher abandons the
// block and rethrows it with the kernel and block named.
//
// Switching: a fiber is entered the first time with makecontext/setcontext, and from then on
// with _setjmp/_longjmp, which (unlike swapcontext) save no signal mask and so make no system
// call: the backward kernel's warp sums switch millions of times per test run.

// _longjmp to another stack is what a fiber switch is; the fortified longjmp refuses it.
#undef _FORTIFY_SOURCE

#include <dlfcn.h>
#include <link.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"
#include "pks4emu/device.h"

// Shared memory is this library's thread-local storage (see device.h). One thread-local byte of
// the runtime's own makes sure there is a block to find; it is poisoned with the rest.
__shared__ volatile char pks4emu_shared_anchor;

namespace pks4emu {
namespace detail {

ThreadState* current_thread = nullptr;
BlockState current_block{};

namespace {

// CUDA's limits (all compute capabilities the project builds for).
constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long long kMaxGridDim[3] = {2147483647ULL, 65535ULL, 65535ULL};
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr int kWarp = 32;
// Kernel frames are small (states in arrays of at most a few KB); the exception machinery and
// error messages need some more. A guard page below each stack turns an overflow into a crash.
constexpr size_t kStackBytes = 256 * 1024;

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Shfl:
      return "__shfl_sync";
    case WarpOp::ShflUp:
      return "__shfl_up_sync";
    case WarpOp::ShflDown:
      return "__shfl_down_sync";
    case WarpOp::ShflXor:
      return "__shfl_xor_sync";
    case WarpOp::Ballot:
      return "__ballot_sync";
    case WarpOp::Any:
      return "__any_sync";
    case WarpOp::All:
      return "__all_sync";
    case WarpOp::SyncWarp:
      return "__syncwarp";
  }
  return "?";
}

std::string site(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// "0-31, 40, 64-127" for a sorted list of thread indices.
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

unsigned lowest_lane(unsigned bits) { return static_cast<unsigned>(__builtin_ctz(bits)); }

enum class State { Runnable, AtBarrier, InWarpOp, Exited };

struct Fiber : ThreadState {
  int index = 0;  // linear thread index in the block; warp = index / 32, lane = index % 32
  State state = State::Runnable;
  bool started = false;
  ucontext_t start{};  // its entry, used once
  jmp_buf resume;      // where it was suspended
  // Where it waits.
  const char* file = "";
  int line = 0;
  // Its part in a warp operation.
  WarpOp op = WarpOp::SyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int param = 0, width = kWarp;
};

// The lanes of one warp in each condition, and the exchanges its lanes wait in (disjoint masks;
// usually one).
struct Warp {
  unsigned exited = 0, at_barrier = 0;
  struct Exchange {
    WarpOp op;
    unsigned mask, arrived;
    int first;  // thread index of the first lane that arrived, for messages
  };
  std::vector<Exchange> exchanges;
};

struct Stack {
  void* base = nullptr;  // guard page first
  size_t bytes = 0;
};

// Everything about the block being run.
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Stack> stacks;  // kept from block to block and launch to launch
  jmp_buf launcher;
  const std::function<void()>* body = nullptr;
  int count = 0, exited = 0, at_barrier = 0;
  const char* barrier_file = "";
  int barrier_line = 0;
  std::exception_ptr failure;
};

Block block;
std::mutex launch_mutex;  // one grid at a time: shared memory is static storage

std::map<std::string, long long>& launch_bounds() {
  static std::map<std::string, long long> bounds;
  return bounds;
}

// Process-wide rather than per host thread as in CUDA: the library's thread-local storage is
// shared memory.
struct LastError {
  cudaError_t code = cudaSuccess;
  std::string text;
};
LastError last_error;

// This library's thread-local block for the calling thread: every __shared__ variable.
struct SharedMemory {
  char* base = nullptr;
  size_t bytes = 0;
};

int find_tls_size(dl_phdr_info* info, size_t, void* data) {
  auto* found = static_cast<std::pair<ElfW(Addr), size_t>*>(data);
  if (info->dlpi_addr != found->first) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) found->second = info->dlpi_phdr[i].p_memsz;
  return 1;
}

SharedMemory shared_memory() {
  pks4emu_shared_anchor = 0;  // the block is allocated on first use
  Dl_info self_info;
  if (!dladdr(reinterpret_cast<void*>(&find_tls_size), &self_info))
    throw std::runtime_error("pks4emu: cannot find its own library");
  void* handle = dlopen(self_info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr)
    throw std::runtime_error(std::string("pks4emu: cannot find its own library: ") + dlerror());
  link_map* map = nullptr;
  void* data = nullptr;
  const bool found_block = dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 &&
                           dlinfo(handle, RTLD_DI_TLS_DATA, &data) == 0 && data != nullptr;
  std::pair<ElfW(Addr), size_t> found(found_block ? map->l_addr : 0, 0);
  if (found_block) dl_iterate_phdr(find_tls_size, &found);
  dlclose(handle);
  if (found.second == 0) throw std::runtime_error("pks4emu: cannot find its thread-local storage");
  return SharedMemory{static_cast<char*>(data), found.second};
}

Fiber& self() { return *static_cast<Fiber*>(current_thread); }

std::string describe(const Fiber& f) {
  const uint3& t = f.thread_idx;
  return "thread " + std::to_string(f.index) + " (threadIdx (" + std::to_string(t.x) + ", " +
         std::to_string(t.y) + ", " + std::to_string(t.z) + "), warp " +
         std::to_string(f.index / kWarp) + " lane " + std::to_string(f.index % kWarp) + ")";
}

std::string describe_wait(const Fiber& f) {
  return std::string(op_name(f.op)) + "(mask " + hex(f.mask) + ") at " + site(f.file, f.line);
}

std::vector<int> threads_in(State state) {
  std::vector<int> ids;
  for (const Fiber& f : block.fibers)
    if (f.state == state) ids.push_back(f.index);
  return ids;
}

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what); }

Warp& warp_of(const Fiber& f) { return block.warps[static_cast<size_t>(f.index / kWarp)]; }
unsigned lane_bit(const Fiber& f) { return 1u << (f.index % kWarp); }
Fiber& lane_fiber(const Fiber& f, unsigned lane) {
  return block.fibers[static_cast<size_t>(f.index / kWarp * kWarp) + lane];
}

// The exchange of `f`'s warp that waits for `f`, if any.
const Warp::Exchange* exchange_waiting_for(const Fiber& f) {
  for (const Warp::Exchange& x : warp_of(f).exchanges)
    if (x.mask & lane_bit(f)) return &x;
  return nullptr;
}

// Suspends `from` (null: the launcher) and runs `to`; returns when `from` is resumed.
void transfer(jmp_buf from, Fiber& to) {
  if (_setjmp(from) != 0) return;
  current_thread = &to;
  if (!to.started) {
    to.started = true;
    setcontext(&to.start);
  }
  _longjmp(to.resume, 1);
}

// Hands the host thread to the next runnable fiber after `from` in thread order, or back to the
// launcher when there is none (or the block failed). Returns when `from` is resumed.
void switch_away(Fiber& from) {
  if (!block.failure) {
    for (int k = 1; k < block.count; ++k) {
      Fiber& f = block.fibers[static_cast<size_t>((from.index + k) % block.count)];
      if (f.state == State::Runnable) return transfer(from.resume, f);
    }
  }
  if (_setjmp(from.resume) != 0) return;
  current_thread = nullptr;
  _longjmp(block.launcher, 1);
}

void fiber_main() {
  Fiber& f = self();
  try {
    (*block.body)();
  } catch (...) {
    if (!block.failure) block.failure = std::current_exception();
  }
  f.state = State::Exited;
  ++block.exited;
  warp_of(f).exited |= lane_bit(f);
  if (!block.failure) {
    std::string error;
    if (block.at_barrier > 0) {
      error = describe(f) + " exited while threads " + ranges(threads_in(State::AtBarrier)) +
              " wait at __syncthreads() at " + site(block.barrier_file, block.barrier_line) +
              ": every thread of the block must reach every __syncthreads()";
    } else if (const Warp::Exchange* x = exchange_waiting_for(f)) {
      const Fiber& g = block.fibers[static_cast<size_t>(x->first)];
      error = describe(f) + " exited while " + describe(g) + " waits for it in " +
              describe_wait(g);
    }
    if (!error.empty()) block.failure = std::make_exception_ptr(std::runtime_error(error));
  }
  switch_away(f);  // never resumed
}

// The launch configuration's error, or an empty string.
std::string config_error(const char* kernel, dim3 grid, dim3 blk, size_t shared_bytes,
                         cudaError_t& code) {
  code = cudaErrorInvalidConfiguration;
  const unsigned b[3] = {blk.x, blk.y, blk.z};
  const unsigned g[3] = {grid.x, grid.y, grid.z};
  const char* axis = "xyz";
  for (int i = 0; i < 3; ++i) {
    if (b[i] == 0 || b[i] > kMaxBlockDim[i])
      return std::string("blockDim.") + axis[i] + " = " + std::to_string(b[i]) +
             " is outside 1.." + std::to_string(kMaxBlockDim[i]);
    if (g[i] == 0 || g[i] > kMaxGridDim[i])
      return std::string("gridDim.") + axis[i] + " = " + std::to_string(g[i]) +
             " is outside 1.." + std::to_string(kMaxGridDim[i]);
  }
  const unsigned long long threads = 1ULL * b[0] * b[1] * b[2];
  if (threads > kMaxBlockThreads)
    return "a block of " + std::to_string(threads) + " threads exceeds " +
           std::to_string(kMaxBlockThreads);
  if (shared_bytes > kMaxStaticShared) {
    code = cudaErrorInvalidValue;
    return std::to_string(shared_bytes) + " bytes of dynamic shared memory exceed " +
           std::to_string(kMaxStaticShared);
  }
  // "motion_scan_fwd_kernel<Ktraits>" -> "motion_scan_fwd_kernel"
  std::string name(kernel);
  name = name.substr(0, name.find_first_of("< \t"));
  const auto it = launch_bounds().find(name);
  if (it != launch_bounds().end() && static_cast<long long>(threads) > it->second) {
    code = cudaErrorLaunchOutOfResources;
    return "a block of " + std::to_string(threads) + " threads exceeds the kernel's " +
           "__launch_bounds__(" + std::to_string(it->second) + ")";
  }
  return "";
}

void run_block(const std::function<void()>& body, const SharedMemory& shared) {
  // Poison shared memory: what a block reads without having written it is NaN.
  std::memset(shared.base, 0xff, shared.bytes);
  const dim3 bd = current_block.block_dim;
  block.count = static_cast<int>(bd.x * bd.y * bd.z);
  block.fibers.assign(static_cast<size_t>(block.count), Fiber{});
  block.warps.assign(static_cast<size_t>((block.count + kWarp - 1) / kWarp), Warp{});
  block.body = &body;
  block.exited = block.at_barrier = 0;
  block.failure = nullptr;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (block.stacks.size() < block.fibers.size()) {
    Stack s;
    s.bytes = kStackBytes + page;
    s.base = mmap(nullptr, s.bytes, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (s.base == MAP_FAILED) throw std::runtime_error("pks4emu: cannot map a fiber stack");
    mprotect(s.base, page, PROT_NONE);
    block.stacks.push_back(s);
  }
  for (int i = 0; i < block.count; ++i) {
    Fiber& f = block.fibers[static_cast<size_t>(i)];
    const unsigned u = static_cast<unsigned>(i);
    f.index = i;
    f.thread_idx = uint3{u % bd.x, u / bd.x % bd.y, u / (bd.x * bd.y)};
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = static_cast<char*>(block.stacks[static_cast<size_t>(i)].base) + page;
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.start, fiber_main, 0);
  }
  transfer(block.launcher, block.fibers[0]);
  current_thread = nullptr;
  if (block.failure) std::rethrow_exception(block.failure);
  if (block.exited != block.count) {
    // A safety net: the checks at each barrier and exchange raise before this can happen.
    std::string what = "no thread can continue:";
    if (block.at_barrier > 0)
      what += " threads " + ranges(threads_in(State::AtBarrier)) + " wait at __syncthreads() at " +
              site(block.barrier_file, block.barrier_line) + ";";
    for (const Fiber& f : block.fibers)
      if (f.state == State::InWarpOp)
        what += " " + describe(f) + " waits in " + describe_wait(f) + ";";
    if (block.exited > 0) what += " threads " + ranges(threads_in(State::Exited)) + " exited";
    fail("deadlock: " + what);
  }
}

}  // namespace

void register_launch_bounds(const char* kernel, long long max_threads) {
  launch_bounds()[kernel] = max_threads;
}

void run_grid(const char* kernel, dim3 grid, dim3 blk, size_t shared_bytes,
              const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  cudaError_t code = cudaSuccess;
  const std::string error = config_error(kernel, grid, blk, shared_bytes, code);
  if (!error.empty()) {
    // As the real runtime does: the launch does not happen, the error waits for
    // cudaGetLastError().
    last_error.code = code;
    last_error.text = "launch of " + std::string(kernel) + ": " + error;
    return;
  }
  const SharedMemory shared = shared_memory();
  current_block.grid_dim = grid;
  current_block.block_dim = blk;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        current_block.block_idx = uint3{x, y, z};
        try {
          run_block(body, shared);
        } catch (const std::exception& e) {
          throw std::runtime_error("CUDA emulation: " + std::string(kernel) + ", block (" +
                                   std::to_string(x) + ", " + std::to_string(y) + ", " +
                                   std::to_string(z) + "): " + e.what());
        }
      }
    }
  }
}

void block_barrier(const char* file, int line) {
  Fiber& f = self();
  if (block.exited > 0)
    fail(describe(f) + " reached __syncthreads() at " + site(file, line) + " after threads " +
         ranges(threads_in(State::Exited)) +
         " exited: every thread of the block must reach every __syncthreads()");
  if (block.at_barrier > 0 &&
      (block.barrier_line != line || std::strcmp(block.barrier_file, file) != 0))
    fail(describe(f) + " reached __syncthreads() at " + site(file, line) + " while threads " +
         ranges(threads_in(State::AtBarrier)) + " wait at __syncthreads() at " +
         site(block.barrier_file, block.barrier_line) +
         ": the threads of a block must reach the same barriers");
  if (const Warp::Exchange* x = exchange_waiting_for(f)) {
    const Fiber& g = block.fibers[static_cast<size_t>(x->first)];
    fail(describe(f) + " reached __syncthreads() at " + site(file, line) + " while " +
         describe(g) + " waits for it in " + describe_wait(g));
  }
  if (block.at_barrier == 0) {
    block.barrier_file = file;
    block.barrier_line = line;
  }
  if (++block.at_barrier == block.count) {  // the last one releases the others and goes on
    for (Fiber& g : block.fibers)
      if (g.state == State::AtBarrier) g.state = State::Runnable;
    for (Warp& w : block.warps) w.at_barrier = 0;
    block.at_barrier = 0;
    return;
  }
  f.state = State::AtBarrier;
  f.file = file;
  f.line = line;
  warp_of(f).at_barrier |= lane_bit(f);
  switch_away(f);
}

uint64_t warp_sync(WarpOp op, unsigned mask, uint64_t value, int param, int width,
                   const char* file, int line) {
  Fiber& f = self();
  Warp& warp = warp_of(f);
  const unsigned lanes =
      static_cast<unsigned>(std::min(kWarp, block.count - f.index / kWarp * kWarp));
  // For error messages only: this is the hot path of the backward's warp sums.
  auto call = [&]() {
    return describe(f) + " calls " + op_name(op) + "(mask " + hex(mask) + ") at " +
           site(file, line);
  };
  if (!(mask & lane_bit(f))) fail(call() + ", a mask without its own lane");
  if (lanes < 32 && (mask >> lanes) != 0u)
    fail(call() + ", whose mask names lanes beyond the " + std::to_string(lanes) +
         " threads of its warp");
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0)
    fail(call() + " with width " + std::to_string(width) + " (expected a power of 2 up to 32)");
  if ((op == WarpOp::ShflXor || op == WarpOp::ShflUp || op == WarpOp::ShflDown) &&
      (param < 0 || param >= kWarp))
    fail(call() + " with a lane offset of " + std::to_string(param));
  if (mask & warp.exited)
    fail(call() + ", which names lane " + std::to_string(lowest_lane(mask & warp.exited)) +
         ", whose thread has exited");
  if (mask & warp.at_barrier) {
    const Fiber& g = lane_fiber(f, lowest_lane(mask & warp.at_barrier));
    fail(call() + ", which names lane " + std::to_string(g.index % kWarp) +
         ", whose thread waits at __syncthreads() at " + site(g.file, g.line));
  }
  Warp::Exchange* exchange = nullptr;
  for (Warp::Exchange& x : warp.exchanges) {
    if (!(x.mask & mask)) continue;
    if (x.mask != mask || x.op != op) {
      const Fiber& g = block.fibers[static_cast<size_t>(x.first)];
      fail("warp operations do not match: " + call() + " while " + describe(g) +
           " waits in " + describe_wait(g));
    }
    exchange = &x;
  }
  if (exchange == nullptr) {
    warp.exchanges.push_back(Warp::Exchange{op, mask, 0u, f.index});
    exchange = &warp.exchanges.back();
  }
  exchange->arrived |= lane_bit(f);
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  f.width = width;
  f.file = file;
  f.line = line;
  f.state = State::InWarpOp;
  if (exchange->arrived != mask) {
    switch_away(f);
    return f.result;
  }
  // Every lane is here: exchange, release them, and go on.
  warp.exchanges.erase(warp.exchanges.begin() + (exchange - warp.exchanges.data()));
  unsigned ballot = 0;
  for (unsigned bits = mask; bits; bits &= bits - 1) {
    const unsigned k = lowest_lane(bits);
    if (lane_fiber(f, k).value != 0u) ballot |= 1u << k;
  }
  for (unsigned bits = mask; bits; bits &= bits - 1) {
    const int k = static_cast<int>(lowest_lane(bits));
    Fiber& g = lane_fiber(f, static_cast<unsigned>(k));
    const int w = g.width, seg = k & ~(w - 1);  // first lane of k's width-segment
    int src = k;
    switch (op) {
      case WarpOp::Shfl:
        src = seg + (g.param & (w - 1));
        break;
      case WarpOp::ShflUp:
        src = (k - seg) >= g.param ? k - g.param : k;
        break;
      case WarpOp::ShflDown:
        src = (k - seg) + g.param < w ? k + g.param : k;
        break;
      case WarpOp::ShflXor:
        src = k ^ g.param;
        if ((src & ~(w - 1)) > seg) src = k;  // a later segment: its own value, as in CUDA
        break;
      default:
        break;
    }
    if (!(mask >> src & 1u))
      fail(describe(g) + " reads lane " + std::to_string(src) + " in " + describe_wait(g) +
           ", a lane outside the mask");
    switch (op) {
      case WarpOp::Ballot:
        g.result = ballot;
        break;
      case WarpOp::Any:
        g.result = ballot != 0u;
        break;
      case WarpOp::All:
        g.result = ballot == mask;
        break;
      case WarpOp::SyncWarp:
        g.result = 0;
        break;
      default:
        g.result = lane_fiber(f, static_cast<unsigned>(src)).value;
    }
    g.state = State::Runnable;
  }
  return f.result;
}

}  // namespace detail
}  // namespace pks4emu

cudaError_t cudaGetLastError() {
  const cudaError_t code = pks4emu::detail::last_error.code;
  pks4emu::detail::last_error.code = cudaSuccess;
  return code;
}

cudaError_t cudaPeekAtLastError() { return pks4emu::detail::last_error.code; }

const char* cudaGetErrorString(cudaError_t err) {
  static std::string text;
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      text = "invalid argument";
      break;
    case cudaErrorInvalidConfiguration:
      text = "invalid configuration argument";
      break;
    case cudaErrorLaunchOutOfResources:
      text = "too many resources requested for launch";
      break;
    default:
      text = "unknown error";
  }
  if (!pks4emu::detail::last_error.text.empty())
    text += " (emulation: " + pks4emu::detail::last_error.text + ")";
  return text.c_str();
}
