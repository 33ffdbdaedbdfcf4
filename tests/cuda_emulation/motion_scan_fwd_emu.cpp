// The CUDA forward kernel's own source, csrc/motion_scan/motion_scan_fwd.cu, compiled by the host
// compiler: the builder puts include/ (the emulated CUDA headers) first on the include path, then
// the folder of the kernel sources, so that nothing here is a copy of the kernel.
#include "motion_scan_fwd.cu"

// The kernel's __launch_bounds__, which the builder reads from the source (a host compiler cannot
// see them), registered for the emulated launcher.
namespace pks4 {
namespace cuda {
#include "motion_scan_fwd.launch_bounds.inc"
}  // namespace cuda
}  // namespace pks4
