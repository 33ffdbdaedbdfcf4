// Host emulation of <cuda_runtime.h> for the kernel sources: the runtime API, the execution-space
// keywords, the built-in variables, barriers, warp intrinsics and the kernel launch. See
// pks4emu/device.h for how the execution model is emulated.
#pragma once

#include "cuda_runtime_api.h"
#include "pks4emu/device.h"
