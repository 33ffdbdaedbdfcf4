"""A host emulation of the CUDA execution model that compiles and runs the CUDA kernels' own
source on the CPU, for ``tests/test_cuda_emulation.py``; see ``builder.py``."""
