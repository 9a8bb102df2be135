// Driver API entry points without linking libcuda.
//
// Why: our libraries link cudart statically and must load on machines whose libcuda comes
// with the driver (and on CI machines with none). cudart already holds a handle on the
// driver, and cudaGetDriverEntryPointByVersion hands out driver functions through it.
//
//   CUtensorMap map;
//   auto encode = clusterfuse::driver::tensor_map_encode_tiled();  // nullptr if unavailable
//   if (!encode) return cudaErrorNotSupported;
//   CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ptr, dims, strides, box, elem_strides,
//                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
//                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
#pragma once

#include <cuda.h>  // types and enums only: nothing here calls a cu* symbol directly
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

namespace clusterfuse {
namespace driver {

// Look up driver function `symbol` as introduced in driver API version `version`
// (e.g. 12000 for CUDA 12.0). Returns nullptr when the driver does not have it.
template <typename Fn>
inline Fn entry_point(const char* symbol, int version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(symbol, &fn, version, cudaEnableDefault, &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<Fn>(fn);
}

// cuTensorMapEncodeTiled (TMA descriptor for a tiled box), resolved once per process.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn =
      entry_point<PFN_cuTensorMapEncodeTiled_v12000>("cuTensorMapEncodeTiled", 12000);
  return fn;
}

}  // namespace driver
}  // namespace clusterfuse
