// clusterfuse/step/layer_programs.cuh — the persistent decode step's (kernels/step/decode_step.cu)
// two per-cluster programs, the attention block's for one KV head group and the FFN block's for
// one slice of the intermediate dimension: each runs the per-block kernel's own statements
// (attention/group_program_body.cuh, ffn/group_program_body.cuh) with the names they expect, for
// a group / slice id that the caller loops over (virtual clusters: more groups than resident
// clusters), so that every phase keeps one implementation and the step partitions each phase as
// the per-block kernel of the same cluster size does (bit-identical outputs). Both use the DSM
// exchange and leave the cluster's last relaxed arrival open for the caller's cluster_wait().
// Also the first weights of each program, for the L2 prefetches the step issues before its grid
// barriers (weights do not depend on activations).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include "clusterfuse/attention/block_program.cuh"
#include "clusterfuse/elements.cuh"
#include "clusterfuse/ffn/block_phases.cuh"
#include "clusterfuse/ffn/block_program.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/split_range.cuh"
#include "clusterfuse/step/timeline.cuh"

namespace clusterfuse {
namespace step {

// The attention block's program (phases 0-3) for KV head group `cid` on block `rank` of its
// cluster: the group's fp32 partial of the O projection in p.partials + cid·B·H. p: the layer's
// parameters (shared memory). ex_bars: the exchanges' two mbarriers (initialised once per launch),
// completing in phase `parity` of this call. Block-collective; ends with the cluster's relaxed
// arrival open (cluster_wait() before shared memory is reused). kTimeline builds stamp the
// program's phases into `stamps` (one layer of the block's timeline row; nullptr: not this run).
template <class Cfg, bool kTimeline>
__device__ __forceinline__ void attention_group(const typename Cfg::Params& p, uint64_t* ex_bars, int rank, int cid,
                                                uint32_t parity, unsigned long long* stamps) {
  namespace cg = cooperative_groups;
  namespace at = clusterfuse::attention;
  namespace gv = clusterfuse::gemv;
  using clusterfuse::split_range;
  using clusterfuse::dsm::cluster_arrive_relaxed;
  using clusterfuse::dsm::cluster_wait;
  using at::Piece;
  using at::qkv_pieces;
  using at::region_row;
  using T = typename Cfg::T;
  using Layout = at::BlockLayout<Cfg>;
  using SeqInfo = typename Cfg::SeqInfo;
  constexpr int HD = Cfg::HD, G = Cfg::G, NT = Cfg::NT, kThreads = Cfg::kThreads, kWarps = Cfg::kWarps;
  constexpr int kMaxBatch = Cfg::kMaxBatch, kMaxCluster = Cfg::kMaxCluster, kRows = Cfg::kRows;
  constexpr int kQkvGemvDepth = Cfg::kQkvGemvDepth, kOGemvDepth = Cfg::kOGemvDepth;
  constexpr int kL2PrefetchSteps = Cfg::kL2PrefetchSteps;
  constexpr bool kQkNorm = Cfg::kQkNorm, kWindow = Cfg::kWindow;
  constexpr bool kDsm = true, kFlat = false, kAsyncEx = true;
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int B = p.B, H = p.H, C = p.C, nkv = p.kv.nkv;
  auto group_sync = [&] { cluster.sync(); };  // the global exchanges' (not taken: DSM)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  auto wait_inputs = [] {};                                 // inside one launch: the grid barrier ordered them
  auto stamp = [stamps](unsigned long long*, at::Stamp s) {  // the body's own stamps: kNormed..kProjected
    clusterfuse::step::stamp<kTimeline>(stamps, kAttnNormed + (s - at::kNormed));
  };
  (void)kFlat;
#include "clusterfuse/attention/group_program_body.cuh"
}

// The FFN block's program for slice `cid` of NC slices of the intermediate dimension on block
// `rank` of its cluster: the slice's fp32 partial of the down projection in p.partials + cid·B·H.
// p: the layer's parameters (shared memory). Block-collective; ends with the cluster's arrival
// open (cluster_wait() before shared memory is reused). kTimeline builds stamp the program's
// phases into `stamps` (one layer of the block's timeline row; nullptr: not this run).
template <typename T, int NT, bool kTimeline>
__device__ __forceinline__ void ffn_group(const ffn::FfnParams& p, int rank, int cid, int NC,
                                          unsigned long long* stamps) {
  namespace cg = cooperative_groups;
  namespace gv = clusterfuse::gemv;
  using clusterfuse::from_f;
  using clusterfuse::Pack8;
  using clusterfuse::split_range;
  using clusterfuse::to_f;
  using Layout = ffn::BlockLayout;
  constexpr bool kDsm = true;
  constexpr int kThreads = ffn::kBlockThreads, kWarps = kThreads / 32;
  // GEMV pipeline depth 2, not the FFN kernel's 3: with 3, the step's kernel (both programs in one
  // register allocation) spilled 1.6 KB per thread, inside the GEMV loops (ptxas, bf16 hd128 GQA 1:
  // 1620 bytes of spill stores; with 2: 32). The depth changes no result: each item's mma run the
  // same steps in the same order, only fewer loads are in flight ahead of them.
  constexpr int kGemvDepth = 2, kL2PrefetchSteps = ffn::kL2PrefetchSteps;
  extern __shared__ __align__(16) unsigned char smem[];
  const int B = p.B, H = p.H, I = p.I, C = p.cluster;
  const int warp = threadIdx.x >> 5;
  auto wait_inputs = [] {};
  auto stamp = [stamps](ffn::Stamp s) { clusterfuse::step::stamp<kTimeline>(stamps, kFfnNormed + s); };
#include "clusterfuse/ffn/group_program_body.cuh"
}

// The first k chunk of KV head group `cid`'s Q/K/V rows on block `rank` (what its phase 1 streams
// first), for an L2 prefetch: as the group program's qkv_rows(0).
template <class Cfg>
__device__ __forceinline__ gemv::WeightPieces<typename Cfg::T> attention_first_weights(const typename Cfg::T* w_qkv,
                                                                                       int rank, int C, int cid,
                                                                                       int nh, int nkv, int H,
                                                                                       int kc) {
  attention::Piece pc[3];
  const int npc = attention::qkv_pieces<Cfg>(rank, C, pc);
  gemv::WeightPieces<typename Cfg::T> w{{w_qkv, w_qkv, w_qkv}, {0, 0, 0}, H, kc < H ? kc : H};
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    if (i >= npc) break;
    w.seg[i] = w_qkv + (size_t)(attention::region_row<Cfg>(pc[i].region, cid, nh, nkv) + pc[i].row0) * H;
    w.rows[i] = pc[i].rows;
  }
  return w;
}

// Slice `cid`'s gate and up rows on block `rank` (its phase 1's weights), for an L2 prefetch: as
// the FFN group program's w1.
template <typename T>
__device__ __forceinline__ gemv::WeightRows<T> ffn_first_weights(const T* w_gate_up, int rank, int C, int cid, int NC,
                                                                 int H, int I) {
  int i0, i1, r0, r1;
  clusterfuse::split_range(I / 8, NC, cid, 8, i0, i1);
  clusterfuse::split_range((i1 - i0) / 8, C, rank, 8, r0, r1);
  return gemv::WeightRows<T>{{w_gate_up + (size_t)(i0 + r0) * H, w_gate_up + (size_t)(I + i0 + r0) * H, nullptr, nullptr},
                             2, r1 - r0, H, H};
}

}  // namespace step
}  // namespace clusterfuse
