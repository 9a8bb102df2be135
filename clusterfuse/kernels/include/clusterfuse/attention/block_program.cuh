// clusterfuse/attention/block_program.cuh — what the fused attention block's program for one KV
// head group (attention/group_program_body.cuh) needs beside its phases (block_phases.cuh), shared
// by the per-block kernel (kernels/attention/attention_block.cu: one launch per layer, a cluster
// per group) and the persistent decode step (kernels/step/decode_step.cu: every layer in one
// launch, a cluster looping over groups): the build's compile-time shape (BlockConfig), the
// shared-memory layout (BlockLayout, the same on the host for the plans and on the device), a
// block's pieces of the group's Q/K/V rows, the exchange kinds and the profiling timeline's stamps.
// What differs between the two callers stays with them: the grid barrier and the cross-cluster sum
// of the partials, the programmatic-launch wait, the mbarriers' initialisation and phase parity,
// and the cluster wait that closes the relaxed arrival after the merge.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stddef.h>
#include <stdint.h>

#include "clusterfuse/abi/attention_block.h"
#include "clusterfuse/attention/block_params.cuh"
#include "clusterfuse/attention/block_phases.cuh"
#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/attention/split_kv_mma.cuh"
#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/dsm.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/split_range.cuh"

namespace clusterfuse {
namespace attention {

// How the blocks of a KV head group exchange q,k,v, their attention states and o:
enum Exchange : int {
  kExGlobal = 0,  // a thread-block cluster; through a global workspace, with cluster barriers
  kExDsm = 1,     // a thread-block cluster; through distributed shared memory
  kExFlat = 2,    // no hardware cluster (launched with clusters of 1): C consecutive blocks form
                  // the group, through the global workspace, with barriers on a per-group counter
                  // in global memory (grid_sync.cuh). Needs the whole grid resident, but not its
                  // groups inside one GPC: at one block per SM an H200 holds 132 blocks, against
                  // 30 clusters of 4 or 7 of 16 (bench/results/attention_plans_h200.json).
};

// Timeline (profiling builds): per block [globaltimer at start, at end, SM id, clock64 at each stamp].
enum Stamp : int { kStart, kWaited, kNormed, kQkv, kExchanged, kAppended, kAttended, kMerged, kProjected, kBarrier, kEnd,
                   kStamps };
constexpr int kTimelineSlots = 3 + kStamps;

template <bool kOn>
__device__ __forceinline__ void stamp(unsigned long long* timeline, Stamp s) {
  if constexpr (kOn) {
    if (threadIdx.x != 0 || !timeline) return;
    unsigned long long* t = timeline + (size_t)blockIdx.x * kTimelineSlots;
    if (s == kStart || s == kEnd) {
      unsigned long long ns;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
      t[s == kStart ? 0 : 1] = ns;
    }
    if (s == kStart) {
      unsigned int sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      t[2] = sm;
    }
    t[3 + s] = clock64();
  }
}

// The compile-time shape of a build: element type, head dim, GQA ratio, 8-sequence batch tiles of
// the mma GEMVs, block size, and the model features (QK-norm, sliding window) and profiling.
template <typename T_, int HD_, int G_, int NT_, int kThreads_, bool kQkNorm_, bool kWindow_, bool kTimeline_>
struct BlockConfig {
  using T = T_;
  static constexpr int HD = HD_, G = G_, NT = NT_, kThreads = kThreads_;
  static constexpr bool kQkNorm = kQkNorm_, kWindow = kWindow_, kTimeline = kTimeline_;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kMaxBatch = 8 * NT;
  static constexpr int kMaxCluster = CF_ATTENTION_BLOCK_MAX_CLUSTER;
  // Register pipeline depth of the Q/K/V and O GEMVs (gemv.cuh; depth - 1 steps of 4 KB in flight
  // per warp). 2, not gemv.cuh's 3: on an H200 the isolated block ran 79.2 -> 74.9 µs (Llama-2-7B
  // S=1K), 130.6 -> 117.3 (S=8K), 63.2 -> 57.7 (Llama-3-8B S=1K), and deeper was slower still
  // (bench/results/gemv_depth_ring_h200.md). ptxas (HD=128, G=1): the kernel's spills 160 -> 0
  // bytes per thread, the key loop's 92 -> 0; the kernel's 255 registers are its limit, not bytes
  // in flight.
  static constexpr int kQkvGemvDepth = 2;
  static constexpr int kOGemvDepth = 2;
  static constexpr int kRows = (G + 2) * HD;  // the cluster's Q, K, V rows of W_qkv
  static constexpr int kL2PrefetchSteps = 4;  // first weight steps per warp prefetched into L2 at a phase boundary
  using SeqInfo = attention::SeqInfo<kMaxBatch>;
  using Params = BlockParams<T, kMaxCluster>;

  static_assert(HD == 64 || HD == 128, "head_dim must be 64 or 128");
  static_assert(G >= 1 && G <= 8, "GQA ratio must be in 1..8");
  static_assert(offsetof(SeqInfo, first) - offsetof(SeqInfo, k0) == 2 * kMaxBatch * sizeof(int),
                "at::WorkList reads k0, k_end, first as consecutive arrays");
  // The merge reads the new token's v row from res while peers may already store o into xo, which
  // starts at res: o's rows (T) must end before the v rows (fp32).
  static_assert(gemv::smem_ld(G * HD) * 2 <= (G + 1) * HD * 4, "o in shared memory overlaps the v rows of res");
};

// Shared-memory layout, identical on host and device (the regions are listed in the constructor).
template <class Cfg>
struct BlockLayout {
  int ld1, ld2, off_res, off_part, off_bacc, off_bml, off_rstd, off_seq, off_qfrag, bytes;

  // Regions whose lifetimes do not overlap share room, so that batch 16 with GQA 4 (Llama-3-8B)
  // still fits two blocks per SM (every grid co-resident):
  //   [0, A):   phase 1's normed x, then phase 2's per-warp states (the tensor-core loop: the parts
  //             of sequences cut between warps, at::partial_slots) followed by the block states
  //             bacc and right after them bml (the merge reads a peer's (m, l) at bacc + B·G·HD,
  //             through DSM, until its end);
  //   res:      q,k,v (fp32), then phase 3's o (the merge writes it once every q is consumed);
  //   part:     the GEMV k-split partials of phases 1 and 3, or phase 2's q fragments.
  __host__ __device__ BlockLayout(int B, int kc, int part_floats) {
    using clusterfuse::detail::align16;
    using clusterfuse::detail::max_int;
    constexpr int G = Cfg::G, HD = Cfg::HD;
    ld1 = gemv::smem_ld(kc);
    ld2 = gemv::smem_ld(G * HD);
    off_bacc = align16(warp_states(Cfg::kWarps) * G * (HD + 2) * 4);
    off_bml = off_bacc + B * G * HD * 4;
    off_res = align16(max_int(B * ld1 * 2, off_bml + B * G * 2 * 4));
    off_part = off_res + align16(max_int(Cfg::kRows * B * 4, B * ld2 * 2));
    off_qfrag = off_part;  // the tensor-core key loop's q fragments, per warp
    off_rstd = off_part + align16(max_int(part_floats * 4, Cfg::kWarps * MmaSoftmax<typename Cfg::T, HD, G>::kQfragBytesPerWarp));
    off_seq = off_rstd + Cfg::kMaxBatch * 4;
    bytes = align16(off_seq + (int)sizeof(typename Cfg::SeqInfo));
  }
};

// A block's share of the cluster's Q/K/V rows is one contiguous run of 16-row units of the
// cluster-local row space [q rows | k rows | v rows]; it falls into at most 3 regions (pieces),
// which phase 1 streams as one GEMV (gemv.cuh WeightPieces): a GEMV per piece restarted the
// pipeline at each piece, and a block with two pieces took 8-10 µs longer than one with one
// (H100, Llama-3-8B batch 16, bench/results/qkv_pieces_h100.md).
struct Piece {
  int region, row0, rows, lr0;  // region 0/1/2 = q/k/v; first row inside it; count; local row
};

template <class Cfg>
__host__ __device__ inline int qkv_pieces(int rank, int C, Piece (&pc)[3]) {
  constexpr int G = Cfg::G, HD = Cfg::HD;
  int lo, hi;
  clusterfuse::split_range(Cfg::kRows / 16, C, rank, 16, lo, hi);
  int n = 0;
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    const int b0 = r == 0 ? 0 : (G + r - 1) * HD, b1 = (G + r) * HD;
    const int a = lo > b0 ? lo : b0, b = hi < b1 ? hi : b1;
    if (a < b) pc[n++] = Piece{r, a - b0, b - a, a};
  }
  return n;
}

// First W_qkv row of a region for KV head group `cid`.
template <class Cfg>
__host__ __device__ inline int region_row(int region, int cid, int nh, int nkv) {
  constexpr int G = Cfg::G, HD = Cfg::HD;
  return region == 0 ? cid * G * HD : region == 1 ? (nh + cid) * HD : (nh + nkv + cid) * HD;
}

}  // namespace attention
}  // namespace clusterfuse
