// clusterfuse/ffn/block_program.cuh — what the fused FFN block's program needs beside its phases
// (block_phases.cuh): the shared-memory layout (identical on host and device) and the activation
// gather over the cluster, for the per-block kernel (kernels/ffn/ffn_block.cu) and the persistent
// decode step (kernels/step/decode_step.cu). kThreads: the block size (both run 256).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "clusterfuse/cluster_gather.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/split_range.cuh"

namespace clusterfuse {
namespace ffn {

constexpr int kBlockThreads = 256;   // the FFN program's block size (per-block kernel and decode step)
constexpr int kGemvDepth = 3;        // register pipeline depth of the GEMVs (gemv.cuh; depth - 1 steps of 4 KB in flight per warp)
constexpr int kL2PrefetchSteps = 4;  // weight steps (16 rows × 128 k) per warp prefetched into L2 at a phase boundary

// The program's phase boundaries, for a profiling timeline (the persistent step's timeline build).
enum Stamp : int { kStampNormed, kStampGateUp, kStampGathered, kStampDown, kStamps };

// The activation exchange: one ClusterGather call per kernel (one output stage), 2-byte elements.
template <int N>
using ActGather = clusterfuse::ClusterGather<N, __nv_bfloat16, clusterfuse::Exchange::kDsm, 1>;

__host__ __device__ inline int act_gather_scratch_bytes(int cluster, int elems) {
  switch (cluster) {
    case 1: return (int)ActGather<1>::scratch_bytes(elems);
    case 2: return (int)ActGather<2>::scratch_bytes(elems);
    case 4: return (int)ActGather<4>::scratch_bytes(elems);
    case 8: return (int)ActGather<8>::scratch_bytes(elems);
    default: return (int)ActGather<16>::scratch_bytes(elems);
  }
}

// Shared-memory layout, identical on host and device. The GEMV partial buffer comes last: only
// the host knows its size (from the k splits), the kernel only needs where it starts. The
// normed x is dead once the phase-1 GEMV is done: the activation gather reuses its region.
struct BlockLayout {
  int ld1, ld2;   // row strides (elements) of the normed x and of the activation slice
  int rows_max;   // phase-1 rows of one block, at most (multiple of 8)
  int off_act, off_res, off_tile, off_part;  // the normed x / gather scratch start at 0

  __host__ __device__ BlockLayout(int B, int H, int lmax, int cluster) {
    ld1 = gemv::smem_ld(H);
    ld2 = gemv::smem_ld(lmax);
    rows_max = 8 * ((lmax / 8 + cluster - 1) / cluster);
    const int xs_bytes = B * ld1 * 2, gather_bytes = act_gather_scratch_bytes(cluster, B * rows_max);
    off_act = ((xs_bytes > gather_bytes ? xs_bytes : gather_bytes) + 15) & ~15;
    off_res = off_act + ((B * ld2 * 2 + 15) & ~15);
    off_tile = off_res + 2 * rows_max * B * 4;  // this block's activation piece [B][rows_max]
    off_part = off_tile + ((B * rows_max * 2 + 15) & ~15);
  }
  __host__ __device__ int bytes(int part_floats) const { return off_part + part_floats * 4; }
};



// Block-collective: every block's activation piece (tile [B][rows_max], its first rows of each
// sequence valid) gathered over the cluster and laid out as the cluster's whole slice,
// act[n][0..L). With init: only initialise the gather's mbarriers (before the cluster barrier
// that publishes them).
template <int kThreads, int N, typename T>
__device__ void gather_act(unsigned char* scratch, const T* tile, T* act, const BlockLayout& lay, int B, int L,
                           bool init) {
  using Gather = clusterfuse::ClusterGather<N, T, clusterfuse::Exchange::kDsm, 1>;
  static_assert(sizeof(T) == 2, "ActGather sizes the scratch for 2-byte elements");
  const int elems = B * lay.rows_max;
  Gather gather(scratch, elems);
  if (init) {
    gather.init_local();
    return;
  }
  const T* all = gather.all_gather(tile, elems);
  const int per_seq = lay.rows_max / 8;  // 16-byte chunks of one sequence's piece
  for (int e = threadIdx.x; e < N * B * per_seq; e += kThreads) {
    const int q = e / (B * per_seq), n = (e / per_seq) % B, r = (e % per_seq) * 8;
    int q0, q1;
    clusterfuse::split_range(L / 8, N, q, 8, q0, q1);  // block q's rows of the slice
    if (r < q1 - q0)
      *reinterpret_cast<uint4*>(act + n * lay.ld2 + q0 + r) =
          *reinterpret_cast<const uint4*>(all + (size_t)q * Gather::stride(elems) + n * lay.rows_max + r);
  }
  __syncthreads();
}

template <int kThreads, typename T>
__device__ void gather_act_any(int C, unsigned char* scratch, const T* tile, T* act, const BlockLayout& lay, int B,
                               int L, bool init) {
  switch (C) {
    case 1: return gather_act<kThreads, 1>(scratch, tile, act, lay, B, L, init);
    case 2: return gather_act<kThreads, 2>(scratch, tile, act, lay, B, L, init);
    case 4: return gather_act<kThreads, 4>(scratch, tile, act, lay, B, L, init);
    case 8: return gather_act<kThreads, 8>(scratch, tile, act, lay, B, L, init);
    default: return gather_act<kThreads, 16>(scratch, tile, act, lay, B, L, init);
  }
}

// The activation gather's mbarriers (at the start of its scratch, shared-memory offset 0)
// invalidated once the FFN program is over (after the cluster wait that ends it: no peer copies
// or arrivals in flight), so that the memory may serve the next program: the persistent decode
// step's attention program writes there, its next FFN program initialises them again. Thread 0.
template <typename T>
__device__ __forceinline__ void invalidate_gather_barriers(unsigned char* scratch) {
  using Gather = ClusterGather<1, T, Exchange::kDsm, 1>;  // the barriers' count does not depend on N
  static_assert(Gather::scratch_bytes(0) == 16, "the activation gather has two mbarriers (one stage)");
  if (threadIdx.x == 0) {
    uint64_t* bars = reinterpret_cast<uint64_t*>(scratch);
    dsm::mbar_inval(bars);
    dsm::mbar_inval(bars + 1);
  }
}

}  // namespace ffn
}  // namespace clusterfuse
