// clusterfuse/moe/block_phases.cuh — the fused MoE block's kernel parameters and the phases of its
// own (the router GEMV's share, the routing of a token, the expert union and the pieces of expert
// columns a cluster owns), for kernels/moe/moe_block.cu. The norm and the expert GEMVs are the FFN
// block's phases (ffn/block_phases.cuh). Block-collective unless a function says otherwise.
//
// Routing rule (clusterfuse/reference/moe.py, `route`): scores = softmax(x_n · W_router^T) in fp32;
// group-limited routing keeps the topk_group groups with the best single score (the others' scores
// count as 0); then the top_k scores. Every "top" is by score, equal scores by the lower index
// (`topk_lowest_index_first`). Weights: the scores times routed_scaling_factor, or normalised to
// sum 1 (norm_topk_prob, top_k > 1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "clusterfuse/abi/moe_block.h"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/split_range.cuh"

namespace clusterfuse {
namespace moe {

constexpr int kMaxExperts = CF_MOE_BLOCK_MAX_EXPERTS;
constexpr int kMaxTopK = CF_MOE_BLOCK_MAX_TOP_K;
constexpr int kMaxGroups = CF_MOE_BLOCK_MAX_GROUPS;
constexpr int kExpertsPerLane = kMaxExperts / 32;
static_assert(kMaxGroups <= 32, "a warp holds one group per lane");

// The kernel's parameters (filled by cf_moe_block_launch from the C ABI's CfMoeBlockArgs and plan).
struct MoeParams {
  const void* x;                 // [B, H]
  const void* norm_w;            // [H]
  const void* w_router;          // [E, H]
  const void* w_gate_up;         // [E, 2I, H]
  const void* w_down;            // [E, H, I]
  const void* w_shared_gate_up;  // [2Is, H] or nullptr
  const void* w_shared_down;     // [H, Is] or nullptr
  const void* residual;          // [B, H] or nullptr
  void* out;                     // [B, H]: x's dtype with residual, else fp32
  float* partials;               // [NC, B, H] fp32
  float* logits_ws;              // [router_kparts, B, E] fp32
  int* topk_ids;                 // [B, K] or nullptr
  float* topk_weights;           // [B, K] or nullptr
  unsigned int* counter;         // grid barrier counter (zero once, self-resetting)
  int B, H, I, Is, E, K, cluster;
  int n_group, topk_group, norm_topk_prob;
  float routed_scaling_factor, eps;
  int piece_max;                 // longest piece (multiple of 8)
  int router_kparts, router_kchunk, ksplit_router, ksplit1, ksplit2;
  int pdl_early;                 // programmatic launch: let the next kernel start before the last grid barrier
};

// The router GEMV's work item `item` (of ceil(E/16) row tiles × router_kparts k parts): the
// partial logits of 16 experts over one k part for all B sequences, into
// logits_ws[kp][n][e] (fp32). xs: the normed x [B][ld1]. part: the GEMV's k-split partials.
template <typename T, int NT, int kDepth>
__device__ __forceinline__ void router_partial_gemv(const MoeParams& p, int item, const T* xs, int ld1, float* part) {
  const int row_tiles = (p.E + gemv::kTileRows - 1) / gemv::kTileRows;
  const int rt = item % row_tiles, kp = item / row_tiles;
  const int k0 = kp * p.router_kchunk, e0 = rt * gemv::kTileRows;
  const int rows = min(gemv::kTileRows, p.E - e0), K = min(p.router_kchunk, p.H - k0);
  const gemv::WeightRows<T> w{{static_cast<const T*>(p.w_router) + (size_t)e0 * p.H + k0, nullptr, nullptr, nullptr},
                              1, rows, p.H, K};
  float* dst = p.logits_ws + (size_t)kp * p.B * p.E + e0;
  gemv::block_gemv<T, NT, kDepth>(w, p.ksplit_router, xs + k0, ld1, p.B, part,
                                  [&](int row, int n, float v) { dst[(size_t)n * p.E + row] = v; });
}

// A score with its expert (or group) index as one key whose unsigned order is the routing order:
// the larger score first, then the lower index. Scores are softmax outputs or the 0 of a dropped
// group (never negative), so their bit patterns order as the values do. 0 = no candidate.
__device__ __forceinline__ unsigned long long rank_key(float score, int index) {
  return ((unsigned long long)__float_as_uint(score) << 32) | (0xffffffffu - (unsigned)index);
}
__device__ __forceinline__ int key_index(unsigned long long key) { return (int)(0xffffffffu - (unsigned)key); }
__device__ __forceinline__ float key_score(unsigned long long key) { return __uint_as_float((unsigned)(key >> 32)); }

__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long key) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
    key = other > key ? other : key;
  }
  return key;
}

// Warp-collective: route one sequence. logits: its E fp32 logits (shared memory; overwritten with
// the scores). Writes its K experts (best first) and their weights to ids / wts (shared memory).
// Lane l holds experts l, l + 32, ...; every reduction has a fixed shape, so every block that
// routes the same logits gets the same bits.
__device__ __forceinline__ void route_token(const MoeParams& p, float* logits, int* ids, float* wts) {
  const int lane = threadIdx.x & 31, E = p.E;
  float v[kExpertsPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? logits[e] : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) {
    v[j] = lane + 32 * j < E ? expf(v[j] - mx) : 0.f;
    sum += v[j];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) v[j] = v[j] / sum;

  if (p.n_group > 0) {
    // Group-limited: lane g < n_group takes its group's best score, the warp keeps the
    // topk_group best groups, and the others' scores become 0.
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j)
      if (lane + 32 * j < E) logits[lane + 32 * j] = v[j];
    __syncwarp();
    const int per_group = E / p.n_group;
    unsigned long long key = 0;
    if (lane < p.n_group) {
      float best = logits[lane * per_group];
      for (int i = 1; i < per_group; ++i) best = fmaxf(best, logits[lane * per_group + i]);
      key = rank_key(best, lane);
    }
    unsigned kept = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      const unsigned long long top = warp_max_key(key);
      kept |= 1u << key_index(top);
      if (key == top) key = 0;
    }
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j) {
      const int e = lane + 32 * j;
      if (e < E && !(kept >> (e / per_group) & 1u)) v[j] = 0.f;
    }
    __syncwarp();  // the group pass's reads of logits are done
  }

  unsigned long long keys[kExpertsPerLane];
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) keys[j] = lane + 32 * j < E ? rank_key(v[j], lane + 32 * j) : 0ull;
  float total = 0.f;
  for (int r = 0; r < p.K; ++r) {
    unsigned long long mine = keys[0];
#pragma unroll
    for (int j = 1; j < kExpertsPerLane; ++j) mine = keys[j] > mine ? keys[j] : mine;
    const unsigned long long top = warp_max_key(mine);
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j)
      if (keys[j] == top) keys[j] = 0;  // keys are unique: only the winner's lane matches
    const float s = key_score(top);
    total += s;  // slot order, as the reference's sum over its top-k row
    if (lane == 0) ids[r] = key_index(top), wts[r] = s;
  }
  __syncwarp();
  if (lane < p.K) {
    const bool normalise = p.norm_topk_prob && p.K > 1;
    wts[lane] = normalise ? wts[lane] / (total + 1e-20f) : wts[lane] * p.routed_scaling_factor;
  }
  __syncwarp();
}

// Block-collective: the experts any of the B sequences chose, ascending, into list; returns how
// many (every thread). used: kMaxExperts / 32 words of shared memory. Integer OR only: the result
// does not depend on the order of the arrivals.
template <int kThreads>
__device__ __forceinline__ int expert_union(const int* ids, int BK, int E, unsigned* used, int* list, int* count) {
  constexpr int kWords = kMaxExperts / 32;
  if (threadIdx.x < kWords) used[threadIdx.x] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < BK; i += kThreads) atomicOr(&used[ids[i] >> 5], 1u << (ids[i] & 31));
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int base = 0;
    for (int w = 0; w < (E + 31) / 32; ++w) {
      const unsigned m = used[w];
      if (m >> lane & 1u) list[base + __popc(m & ((1u << lane) - 1u))] = w * 32 + lane;
      base += __popc(m);
    }
    if (lane == 0) *count = base;
  }
  __syncthreads();
  return *count;
}

// The expert columns of one launch, laid end to end: the shared experts' Is columns (when there
// are any), then each chosen routed expert's I columns in expert order. Cluster c owns the c-th of
// NC near-equal runs of them (units of 8 columns) and walks its run in pieces: a piece lies inside
// one expert and is at most piece_max long. Every cluster computes the same list from the same
// routing, so the columns are covered exactly once without any exchange.
struct Piece {
  int expert;  // routed expert, or -1 for the shared experts
  int c0, len; // the piece's first column inside that expert's I (or Is) columns, and its length
};

// The piece of this cluster's run that starts at column v, v < end. Host and device: the CPU tests
// run this very code (tests/test_moe_routing.py).
__host__ __device__ __forceinline__ Piece piece_at(int v, int end, int Is, int I, const int* list, int piece_max) {
  Piece pc;
  int seg_start, seg_end;
  if (v < Is) {
    pc.expert = -1, seg_start = 0, seg_end = Is;
  } else {
    const int j = (v - Is) / I;
    pc.expert = list[j], seg_start = Is + j * I, seg_end = seg_start + I;
  }
  pc.c0 = v - seg_start;
  int stop = end < seg_end ? end : seg_end;
  stop = stop < v + piece_max ? stop : v + piece_max;
  pc.len = stop - v;
  return pc;
}

// Cluster cid's run of the laid-out columns (of `chosen` routed experts): [v0, v1).
__host__ __device__ __forceinline__ void cluster_run(int Is, int I, int chosen, int clusters, int cid, int& v0,
                                                     int& v1) {
  split_range((Is + chosen * I) / 8, clusters, cid, 8, v0, v1);
}

}  // namespace moe
}  // namespace clusterfuse
