// clusterfuse/tma.cuh — the tensor memory accelerator (TMA, sm_90) for weight streaming: 2-D tile
// copies global → shared memory that complete on an mbarrier, and the host helper that encodes
// the tensor map of a row-major matrix.
//
// Why TMA for weights: one instruction moves a whole 16-row × 128-column tile (4 KB) and holds no
// registers while it is in flight, so a block can keep tens of KB of weight loads outstanding
// (what saturating HBM needs: bandwidth × latency ≈ 3-5 MB across the chip) where register
// pipelines hold 8 KB per warp. Out-of-range rows and columns of a box read as zero and cost no
// HBM traffic.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cuda_runtime.h>
#include <stdint.h>

#include "clusterfuse/driver_api.cuh"
#include "clusterfuse/dsm.cuh"

namespace clusterfuse {
namespace tma {

// ----------------------------------------------------------------------------- device
// Copy the box at (x = column, y = row) of `map` into shared memory at `dst` (shared::cta address,
// 128-byte aligned), retiring the box's bytes on the mbarrier `bar` of this block. One thread
// issues it; arm `bar` with mbar_arrive_expect_tx(bar, box bytes) first (or after: see dsm.cuh).
// `map` is the generic address of a __grid_constant__ kernel parameter (or of global memory).
__device__ __forceinline__ void load_2d(uint32_t dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(dsm::smem_addr(bar))
      : "memory");
}

// Start fetching a tensor map's descriptor so that the first copy through it does not wait for
// it (any thread; a hint, nothing to wait for).
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ----------------------------------------------------------------------------- host
// Encode the tensor map of a row-major [rows, cols] matrix of 2-byte elements (`bf16` selects the
// data type) whose rows are `ld` elements apart, read in boxes of box_rows × box_cols with no
// swizzle (shared memory receives the box row-major). The encoder comes from driver_api.cuh (no
// libcuda link). Returns cudaSuccess, cudaErrorNotSupported (no encoder in this driver) or
// cudaErrorInvalidValue (bad shape or alignment: base and ld·2 must be multiples of 16 bytes).
inline cudaError_t encode_matrix_map(CUtensorMap* map, const void* base, bool bf16, uint64_t rows, uint64_t cols,
                                     uint64_t ld, uint32_t box_rows, uint32_t box_cols) {
  const auto encode = driver::tensor_map_encode_tiled();
  if (!encode) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {ld * 2};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace tma
}  // namespace clusterfuse
