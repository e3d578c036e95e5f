// Portability macros shared by the CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

// Small math helpers are compiled for both the host and the device so that the C++ CPU path,
// which is tested on every machine, runs the very arithmetic the CUDA kernels run.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define KEXUE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KEXUE_HOST_DEVICE inline
#endif
