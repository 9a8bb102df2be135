// Shared by the primitive test/benchmark kernels (cluster_reduce.cu, cluster_gather.cu):
// the element type chosen by CF_DTYPE and the in-kernel timer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifndef CF_DTYPE
#define CF_DTYPE 0  // 0 = float, 1 = bfloat16, 2 = float16 (clusterfuse.ops.primitives.DTYPE_CODES)
#endif

#if CF_DTYPE == 0
using elem_t = float;
#elif CF_DTYPE == 1
using elem_t = __nv_bfloat16;
#elif CF_DTYPE == 2
using elem_t = __half;
#else
#error "CF_DTYPE must be 0 (fp32), 1 (bf16) or 2 (fp16)"
#endif

namespace clusterfuse {
namespace primitives_test {

// Nanoseconds of the GPU's global timer: comparable across SMs, unlike clock64.
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

constexpr size_t kTileAlign = 128;  // tile offset in dynamic shared memory; scratch follows

__host__ __device__ constexpr size_t tile_bytes(int elems, size_t elem_size) {
  return (size_t(elems) * elem_size + kTileAlign - 1) / kTileAlign * kTileAlign;
}

constexpr size_t kMaxSmem = 227 * 1024;  // Hopper's per-block dynamic shared-memory limit

}  // namespace primitives_test
}  // namespace clusterfuse
