// clusterfuse/elements.cuh — the element types of the kernels (bf16, fp16; fp32 for the primitives):
// conversions to and from fp32, rounding through the storage type, and 8 packed elements (one
// 16-byte load).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

namespace clusterfuse {

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ float from_f(float v) { return v; }  // fp32 tiles (the primitives)
// Round an fp32 value to T's precision and back: what reading it back from a T cache gives.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// 8 packed 2-byte elements → fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T lo, hi;
    const uint16_t a = (uint16_t)(w[i] & 0xffffu), b = (uint16_t)(w[i] >> 16);
    memcpy(&lo, &a, 2);
    memcpy(&hi, &b, 2);
    f[2 * i] = to_f(lo);
    f[2 * i + 1] = to_f(hi);
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T lo = from_f<T>(f[2 * i]), hi = from_f<T>(f[2 * i + 1]);
    uint16_t a, b;
    memcpy(&a, &lo, 2);
    memcpy(&b, &hi, 2);
    w[i] = (uint32_t)a | ((uint32_t)b << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// 8 packed elements addressed one by one (the FFN's activation and norm loops).
union Pack8 {
  uint4 u;
  __nv_bfloat16 b[8];
  __half h[8];
  template <typename T> __device__ T& at(int i);
};
template <> __device__ __forceinline__ __nv_bfloat16& Pack8::at(int i) { return b[i]; }
template <> __device__ __forceinline__ __half& Pack8::at(int i) { return h[i]; }

}  // namespace clusterfuse
