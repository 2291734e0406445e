// FASTGAN_HD marks the small inline functions that both the CPU kernels and the
// CUDA kernels call (csrc/philox.h, csrc/activation.h): host and device code
// under nvcc, plain inline functions elsewhere (g++, and the CPU emulation of
// the CUDA sources, csrc/cuda/emulate.cuh).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTGAN_HD __host__ __device__ __forceinline__
#else
#define FASTGAN_HD inline
#endif
