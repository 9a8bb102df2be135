// Pieces shared by the cluster collectives: exchange kinds, dtype conversion, sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

namespace clusterfuse {

// How blocks of a cluster exchange data in a collective.
//   kDsm:    distributed shared memory (st.async / bulk copies into peers, mbarrier signals).
//   kGlobal: the same dataflow through a global-memory workspace (L2) with release/acquire
//            flags: the "without DSM" ablation. Its workspace's counter region must be zero
//            when the kernel starts (memset it before each launch).
enum class Exchange { kDsm = 0, kGlobal = 1 };

namespace detail {

__host__ __device__ constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int min_int(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int max_int(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int log2_exact(int n) { return n <= 1 ? 0 : 1 + log2_exact(n / 2); }
__host__ __device__ constexpr bool is_cluster_size(int n) {
  return n == 1 || n == 2 || n == 4 || n == 8 || n == 16;
}

// Collectives compute in fp32 whatever the tile's type (bf16/fp16 tiles lose no precision
// across rounds); values are rounded to T once, when written back.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Read-only fp32 view of a T array, so reduction operators index T tiles and fp32 buffers
// alike (view[i]); view(i) is the same read, for code that takes a value source.
template <typename T>
struct FloatView {
  const T* p;
  __device__ __forceinline__ float operator[](int i) const { return to_float(p[i]); }
  __device__ __forceinline__ float operator()(int i) const { return to_float(p[i]); }
};

}  // namespace detail
}  // namespace clusterfuse
