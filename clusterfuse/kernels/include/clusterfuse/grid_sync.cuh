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

#ifndef CF_GRID_REDUCE_STAGED  // 1: the fused blocks sum their partials with reduce_partials_staged (0: the A/B)
#define CF_GRID_REDUCE_STAGED 1
#endif

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

// The same sums, bit for bit (each element still added up by one thread in part order 0..P-1), but
// with the whole block's loads of a chunk in flight at once: the threads first copy chunk x
// parts float4s into `scratch` (shared memory), then one thread per element adds its parts up
// there. reduce_partials keeps kUnroll loads in flight per element and only (end-begin)/4 threads
// have an element, so with many parts (Llama-2-7B: 32 clusters, 8 float4s per block at batch 1) it
// makes P/kUnroll dependent L2 round trips where this makes one. `scratch` holds `scratch_len`
// float4s and must not be in use by anyone else (e.g. after a grid barrier that every reader of
// the block's shared memory has passed). Every thread of the block must call it.
template <int kThreads, int kUnroll = 8, class Out>
__device__ __forceinline__ void reduce_partials_staged(const float* partials, int nparts, size_t stride,
                                                       int begin, int end, float4* scratch, int scratch_len,
                                                       Out&& out) {
  if (scratch_len < nparts) {  // not one element's parts: the unstaged sums
    reduce_partials<kUnroll>(partials, nparts, stride, begin, end, out);
    return;
  }
  const int n4 = (end - begin) / 4;
  const int chunk = max(1, min(n4, scratch_len / nparts));  // elements summed per round
  for (int c0 = 0; c0 < n4; c0 += chunk) {
    const int cn = min(chunk, n4 - c0), total = cn * nparts;  // scratch[p * cn + j]: part p of element j
    const float* base = partials + begin + 4 * c0;
    for (int i0 = 0; i0 < total; i0 += kThreads * kUnroll) {
      float4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * kThreads + (int)threadIdx.x;
        if (i < total) {
          const int p = i / cn, j = i - p * cn;
          v[u] = __ldcg(reinterpret_cast<const float4*>(base + (size_t)p * stride + 4 * j));
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * kThreads + (int)threadIdx.x;
        if (i < total) scratch[i] = v[u];
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < cn; j += kThreads) {
      float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int p = 0; p < nparts; ++p) {
        const float4 v = scratch[p * cn + j];
        s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
      }
      out(begin + 4 * (c0 + j), s);
    }
    __syncthreads();  // scratch is free for the next chunk
  }
}

}  // namespace grid
}  // namespace clusterfuse
