// Pieces shared by the cluster collectives: exchange kinds, dtype conversion, sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#include "clusterfuse/elements.cuh"

namespace clusterfuse {

// How blocks of a cluster exchange data in a collective.
//   kDsm:    distributed shared memory (st.async / bulk copies into peers, mbarrier signals).
//   kGlobal: the same dataflow through a global-memory workspace (L2) with release/acquire
//            flags: the "without DSM" ablation. Its workspace's counter region must be zero
//            when the kernel starts (memset it before each launch).
enum class Exchange { kDsm = 0, kGlobal = 1 };

namespace detail {

__host__ __device__ constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
// A non-negative byte count rounded up to 16 (shared-memory regions that float4 / bulk copies use).
__host__ __device__ constexpr int align16(int n) { return (n + 15) & ~15; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int min_int(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int max_int(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int log2_exact(int n) { return n <= 1 ? 0 : 1 + log2_exact(n / 2); }
__host__ __device__ constexpr bool is_cluster_size(int n) {
  return n == 1 || n == 2 || n == 4 || n == 8 || n == 16;
}

// Collectives compute in fp32 whatever the tile's type (bf16/fp16 tiles lose no precision
// across rounds); values are rounded to T once, when written back (elements.cuh's to_f, from_f).
using clusterfuse::from_f;
using clusterfuse::to_f;

// Read-only fp32 view of a T array, so reduction operators index T tiles and fp32 buffers
// alike (view[i]); view(i) is the same read, for code that takes a value source.
template <typename T>
struct FloatView {
  const T* p;
  __device__ __forceinline__ float operator[](int i) const { return to_f(p[i]); }
  __device__ __forceinline__ float operator()(int i) const { return to_f(p[i]); }
};

}  // namespace detail
}  // namespace clusterfuse
