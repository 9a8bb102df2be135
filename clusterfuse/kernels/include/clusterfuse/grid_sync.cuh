// clusterfuse/grid_sync.cuh — deterministic cross-cluster reduction through global memory.
//
// A fused block that partitions its reduction dimension across clusters ends with one fp32
// partial per cluster. Instead of atomics on the output (non-deterministic, and lossy in fp16),
// every cluster writes its partial to a workspace, all blocks meet at a grid barrier, and then
// each block sums a slice of the output over the partials in cluster order 0..P-1: the same
// input gives a bit-identical output.
//
// The grid barrier is only correct when every block of the grid is resident at once; the host
// launcher must check that with cudaOccupancyMaxActiveClusters (or cudaOccupancyMaxActiveBlocks
// PerMultiprocessor) before launching, and refuse otherwise.
#pragma once

#include <stdint.h>

namespace clusterfuse {
namespace grid {

__device__ __forceinline__ unsigned int ld_acquire_gpu(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Grid-wide barrier over a counter that must start at 0 (once, when it is allocated) and that
// this barrier leaves ready for the next use: every block adds 1 except block 0, which adds
// 0x80000000 - (blocks - 1), so the blocks' additions sum to exactly 0x80000000. The top bit
// flips once per barrier and the low bits return to their start value, so no reset (and no
// memset node in a CUDA graph) is needed between launches. One launch at a time per counter.
// Release/acquire at gpu scope make every block's prior global writes visible after the barrier.
// The same barrier over any `blocks` blocks of the grid that share `counter`, `first` true in
// exactly one of them (e.g. a group of blocks that stand in for a thread-block cluster). All of
// them must be resident at once.
__device__ __forceinline__ void group_barrier(unsigned int* counter, unsigned int blocks, bool first) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int add = first ? 0x80000000u - (blocks - 1) : 1u;
    unsigned int old;
    __threadfence();
    asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(add) : "memory");
    while (((old ^ ld_acquire_gpu(counter)) & 0x80000000u) == 0) __nanosleep(20);
  }
  __syncthreads();
}

__device__ __forceinline__ void barrier(unsigned int* counter) {
  group_barrier(counter, gridDim.x * gridDim.y * gridDim.z, (blockIdx.x | blockIdx.y | blockIdx.z) == 0);
}

// out(e, sum) for e in [begin, end): sum over parts p = 0..nparts-1 of partials[p * stride + e],
// in that fixed order. Vectorised by 4 (stride, begin and end multiples of 4; 16-byte aligned);
// `kUnroll` partial loads in flight per thread. Threads of the calling block split the range.
template <int kUnroll = 8, class Out>
__device__ __forceinline__ void reduce_partials(const float* partials, int nparts, size_t stride, int begin,
                                                int end, Out&& out) {
  for (int e = begin + 4 * (int)threadIdx.x; e < end; e += 4 * (int)blockDim.x) {
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    int p = 0;
    for (; p + kUnroll <= nparts; p += kUnroll) {
      float4 v[kUnroll];
#pragma unroll
      for (int i = 0; i < kUnroll; ++i)
        v[i] = __ldcg(reinterpret_cast<const float4*>(partials + (size_t)(p + i) * stride + e));
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) s.x += v[i].x, s.y += v[i].y, s.z += v[i].z, s.w += v[i].w;
    }
    for (; p < nparts; ++p) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(partials + (size_t)p * stride + e));
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    out(e, s);
  }
}

}  // namespace grid
}  // namespace clusterfuse
