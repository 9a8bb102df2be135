// clusterfuse/attention/split_kv_mma.cuh — the split-KV key loop of split_kv.cuh on tensor cores.
//
// Why: a SIMT loop (fp32 FMAs per key and lane group; removed once this loop won) spent ~48 dependent instructions per key and lane group
// (bf16 unpack, 8 FMAs, a 4-level shuffle tree, exp2, 8 FMAs); with one warp per scheduler that is
// ~10 cycles per instruction and the loop runs at ~2 TB/s of KV whatever is in flight
// (bench/results/kv_stages_h200.md). Here a warp folds 16 keys at a time with mma.m16n8k16:
//
//   scores  S^T[G x 16] = Q[G x HD] · K^T[HD x 16]    HD/16 k-steps x 2 key tiles of 8
//   values  O^T[HD x G] += V^T[HD x 16] · P^T[16 x G]  HD/16 dim tiles, one k-step of 16 keys
//
// The C fragment of the score mma (row = head g, columns = keys 2t, 2t+1) is exactly the B
// fragment the value mma needs (k = keys 2t, 2t+1, column = head g), so p never leaves registers.
// Rows g >= G of Q are zero and columns g >= G of O are ignored (G <= 8 heads fill one n8 tile).
//
// Free index choices, fixed here once (each mma reduces over its k index, so any bijection of
// that index applied to both operands gives the same sums):
//   * q·K reduction: lane t's 16-byte piece u of a K row holds dims u*32 + t*8 .. +7; its words
//     (2h, 2h+1) are k-step 2u+h's k pairs (2t, 2t+1) and (2t+8, 2t+9); q is packed to match.
//   * V dims: lane g's 16-byte piece w of a V row holds dims w*64 + g*8 .. +7 (8 lanes read 128
//     contiguous bytes); word e of it is dim tile i = 4w + e, rows g (low half) and g+8 (high half).
//   * tile keys: K rows of keys g and 8+g per lane; V rows of keys 2t, 2t+1, 8+2t, 9+2t, the
//     order of the score fragment's columns.
// q enters the mma as two 2-byte parts, q = hi + lo (hi = q rounded to the cache dtype, lo = the
// rounding error rounded): one score mma each, so the scores carry ~16 mantissa bits of q. With q
// rounded once (8 bits for bf16), real SmolLM2 weights gave logits errors of 3.2e-2 against the
// fp32 reference, over the engine test's bound. p enters the value mma the same way (with p
// rounded once, the 4-layer Llama-3-8B teacher-forced test's top-1 agreement fell to 97.7%); the
// softmax statistics stay fp32. Deterministic: fixed mma and shuffle order, no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/elements.cuh"
#include "clusterfuse/gemv.cuh"

namespace clusterfuse {
namespace attention {

constexpr int kTileKeys = 16;  // keys a warp folds per step

// Sliding window (CF_ATTN_WINDOW builds): a block's cached-key range [k0, k1) may start at the
// window's first key, off the 16-key tiles. Its tiles still start at multiples of 16 — from
// window_tile_start(k0) — so that every whole tile inside one page is one bulk load, as without a
// window; the keys of the first tile before k0 are masked (scores -inf, their V pieces zero). Only
// the block whose range holds the window's start has such keys, in its first tile only.
__host__ __device__ __forceinline__ int window_tile_start(int k0) { return k0 & ~(kTileKeys - 1); }
// Tiles of the range [k0, k1) counted from window_tile_start(k0) (none when empty).
__host__ __device__ __forceinline__ int window_tiles(int k0, int k1) {
  return k1 > k0 ? (k1 - window_tile_start(k0) + kTileKeys - 1) / kTileKeys : 0;
}

// Two fp32 values → one register of two 2-byte elements (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

// Where the 16 rows of a tile start: keys j0 .. j0+15 of sequence b, KV head g (KvLayout::tile).
template <int HD>
struct TileRows {
  size_t base0, base1;
  int split;
  __device__ __forceinline__ TileRows(const KvLayout& kv, int b, int g, int j0) { kv.tile<HD>(b, g, j0, base0, base1, split); }
  __device__ __forceinline__ size_t row(int pos) const {
    return pos < split ? base0 + (size_t)pos * HD : base1 + (size_t)(pos - split) * HD;
  }
  // All 16 keys valid and in one page (a contiguous cache; a paged one whose pages hold a multiple
  // of 16 rows, with key ranges cut at multiples of 16): the loads need no per-row address.
  __device__ __forceinline__ bool whole(int valid) const { return valid == kTileKeys && split >= kTileKeys; }
};

// This lane's pieces of the K rows of a 16-key tile (zero for keys at positions >= valid).
template <int HD>
struct KTile {
  static constexpr int kPieces = HD / 32;  // per row: dims u*32 + t*8
  uint4 k[2][kPieces];                     // keys g, 8 + g

  // piece(pos, dim0): 16 bytes of tile key `pos` from dim0; keys at positions >= valid are not read.
  template <class Piece>
  __device__ __forceinline__ void fill(int valid, Piece&& piece) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int pos = nt * 8 + g;
#pragma unroll
      for (int u = 0; u < kPieces; ++u) k[nt][u] = pos < valid ? piece(pos, u * 32 + t * 8) : make_uint4(0, 0, 0, 0);
    }
  }
  template <typename T>
  __device__ __forceinline__ void load(const T* kc, const TileRows<HD>& rows, int valid) {
    if (rows.whole(valid)) {  // 16 rows in a row: one lane pointer, fixed offsets
      const int lane = threadIdx.x & 31;
      const T* p = kc + rows.base0 + (lane >> 2) * HD + (lane & 3) * 8;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int u = 0; u < kPieces; ++u) k[nt][u] = gemv::ld_stream(p + nt * 8 * HD + u * 32);
      return;
    }
    fill(valid, [&](int pos, int d) { return gemv::ld_stream(kc + rows.row(pos) + d); });
  }
};

// This lane's pieces of the V rows of a 16-key tile.
template <int HD>
struct VTile {
  static constexpr int kPieces = HD / 64;  // per row: dims w*64 + g*8
  uint4 v[4][kPieces];                     // keys 2t, 2t+1, 8+2t, 9+2t

  // Tile position of slot s (also of score s): the score fragment's column order.
  static __device__ __forceinline__ int key(int s, int t) { return (s >> 1) * 8 + 2 * t + (s & 1); }

  template <class Piece>
  __device__ __forceinline__ void fill(int valid, Piece&& piece) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int pos = key(s, t);
#pragma unroll
      for (int w = 0; w < kPieces; ++w) v[s][w] = pos < valid ? piece(pos, w * 64 + g * 8) : make_uint4(0, 0, 0, 0);
    }
  }
  // Zero the pieces of the tile's keys at positions < skip (a window's first tile, read whole):
  // their scores are masked to p = 0, but 0 times a NaN or inf value would still reach O.
  __device__ __forceinline__ void clear_before(int skip) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int w = 0; w < kPieces; ++w)
        if (key(s, t) < skip) v[s][w] = make_uint4(0, 0, 0, 0);
  }
  template <typename T>
  __device__ __forceinline__ void load(const T* vc, const TileRows<HD>& rows, int valid) {
    if (rows.whole(valid)) {  // as KTile::load: key(s, t) = 2t + a constant
      const int lane = threadIdx.x & 31;
      const T* p = vc + rows.base0 + 2 * (lane & 3) * HD + (lane >> 2) * 8;
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int w = 0; w < kPieces; ++w) v[s][w] = gemv::ld_stream(p + key(s, 0) * HD + w * 64);
      return;
    }
    fill(valid, [&](int pos, int d) { return gemv::ld_stream(vc + rows.row(pos) + d); });
  }
};

// What the value mma of a tile needs from its scores: p^T as the B fragment, and the rescale
// factors of this lane's O^T columns (heads 2t, 2t+1).
struct TileProbs {
  uint32_t b0, b1, b0_lo, b1_lo;  // p = hi + lo parts, each rounded to the cache dtype
  float corr_lo, corr_hi;
};

// Online-softmax state of a warp for G <= 8 heads, in mma fragments: lane (g = lane/4, t = lane%4)
// holds head g's running max and its share of the sum, and O^T for dims (dim tile i, rows g and
// g+8) x heads (2t, 2t+1).
template <typename T, int HD, int G>
struct MmaSoftmax {
  static constexpr int kSteps = HD / 16;  // k-steps of q·K^T; dim tiles of V^T·p
  // q's A fragments per k-step, {hi a0, hi a2, lo a0, lo a2} (a1 = a3 = 0: rows g + 8 >= G), in
  // shared memory: kSteps x 32 lanes x 16 bytes per warp, each lane reading back only its own
  // slots. In registers (32 of them) they made the loop spill ~210 bytes per thread at HD=128.
  uint4* qfrag;
  float m, l;
  float acc[kSteps][4];

  static constexpr int kQfragBytesPerWarp = kSteps * 32 * 16;

  // Rolled over the k-steps (unroll 1): this runs once per segment, so at batch 1 every warp runs
  // it once, cold. Unrolled it was ~500-650 SASS instructions, a third of what attend_items_mma
  // executes there, and ncu put two thirds of that function's stall samples on instruction
  // fetch (stall_no_inst; bench/results/instruction_fetch_h200.md).
  // q(head, dim): the pre-scaled fp32 query; frag: this warp's kQfragBytesPerWarp (16-byte aligned).
  template <class Q>
  __device__ __forceinline__ void init(Q&& q, uint4* frag) {
    qfrag = frag;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 1
    for (int s = 0; s < kSteps; ++s) {
      const int d0 = (s >> 1) * 32 + t * 8 + (s & 1) * 4;
      uint32_t w[2][2];  // [hi | lo][a0 | a2]
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float hi[2], lo[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float v = g < G ? q(g, d0 + 2 * r + i) : 0.f;
          hi[i] = round_to<T>(v), lo[i] = v - hi[i];
        }
        w[0][r] = pack2<T>(hi[0], hi[1]);
        w[1][r] = pack2<T>(lo[0], lo[1]);
      }
      qfrag[s * 32 + lane] = make_uint4(w[0][0], w[0][1], w[1][0], w[1][1]);
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[s][c] = 0.f;
    m = -CUDART_INF_F, l = 0.f;
  }

  // Scores of the tile's keys at positions < valid (kWindow: and >= skip); updates (m, l).
  template <bool kWindow = false>
  __device__ __forceinline__ TileProbs scores(const KTile<HD>& f, int valid, int skip = 0) {
    const int lane = threadIdx.x & 31, t = lane & 3;
    float c[2][4] = {};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int u = 0; u < KTile<HD>::kPieces; ++u)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 qa = qfrag[(2 * u + h) * 32 + lane];
          const uint32_t b0 = word(f.k[nt][u], 2 * h), b1 = word(f.k[nt][u], 2 * h + 1);
          gemv::Mma<T>::run(c[nt], qa.x, 0u, qa.y, 0u, b0, b1);  // q hi
          gemv::Mma<T>::run(c[nt], qa.z, 0u, qa.w, 0u, b0, b1);  // q lo
        }
    float sc[4], mx = m;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int key = VTile<HD>::key(s, t);
      bool seen = key < valid;
      if constexpr (kWindow) seen = seen && key >= skip;
      sc[s] = seen ? c[s >> 1][s & 1] : -CUDART_INF_F;
      mx = fmaxf(mx, sc[s]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // mx == -inf: nothing seen and every key masked; p = 0 and the state stays empty.
    const float corr = mx == -CUDART_INF_F ? 1.f : exp2f(m - mx);
    float p[4], psum = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      p[s] = sc[s] == -CUDART_INF_F ? 0.f : exp2f(sc[s] - mx);
      psum += p[s];
    }
    l = l * corr + psum;
    m = mx;
    float hi[4], lo[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) hi[s] = round_to<T>(p[s]), lo[s] = p[s] - hi[s];
    // Heads 2t and 2t+1 live on lanes 8t and 8t + 4.
    return TileProbs{pack2<T>(hi[0], hi[1]), pack2<T>(hi[2], hi[3]), pack2<T>(lo[0], lo[1]), pack2<T>(lo[2], lo[3]),
                     __shfl_sync(0xffffffffu, corr, 8 * t), __shfl_sync(0xffffffffu, corr, 8 * t + 4)};
  }

  // O^T = O^T * corr + V^T · p^T for the tile.
  __device__ __forceinline__ void accumulate(const VTile<HD>& f, const TileProbs& pr) {
#pragma unroll
    for (int w = 0; w < VTile<HD>::kPieces; ++w)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float(&a)[4] = acc[4 * w + e];
        a[0] *= pr.corr_lo, a[1] *= pr.corr_hi, a[2] *= pr.corr_lo, a[3] *= pr.corr_hi;
        const uint32_t v0 = word(f.v[0][w], e), v1 = word(f.v[1][w], e);
        const uint32_t v2 = word(f.v[2][w], e), v3 = word(f.v[3][w], e);
        // A = V^T: row g = the low halves (dim w*64 + g*8 + 2e), row g+8 = the high halves;
        // k = keys (2t, 2t+1) from v0, v1 and (8+2t, 9+2t) from v2, v3.
        const uint32_t a0 = __byte_perm(v0, v1, 0x5410), a1 = __byte_perm(v0, v1, 0x7632);
        const uint32_t a2 = __byte_perm(v2, v3, 0x5410), a3 = __byte_perm(v2, v3, 0x7632);
        gemv::Mma<T>::run(a, a0, a1, a2, a3, pr.b0, pr.b1);        // p hi
        gemv::Mma<T>::run(a, a0, a1, a2, a3, pr.b0_lo, pr.b1_lo);  // p lo
      }
  }

  // Write the state in split_kv.cuh's per-warp layout: acc [G][HD], (m, l) [G][2].
  __device__ __forceinline__ void store(float* wacc, float* wml) const {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float lsum = l + __shfl_xor_sync(0xffffffffu, l, 1);  // fixed tree over the 4 lanes of head g
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const int d = (i >> 2) * 64 + g * 8 + 2 * (i & 3);
      if (2 * t < G) wacc[2 * t * HD + d] = acc[i][0], wacc[2 * t * HD + d + 1] = acc[i][2];
      if (2 * t + 1 < G) wacc[(2 * t + 1) * HD + d] = acc[i][1], wacc[(2 * t + 1) * HD + d + 1] = acc[i][3];
    }
    if (t == 0 && g < G) wml[g * 2] = m, wml[g * 2 + 1] = lsum;
  }
};

// ---------------------------------------------------------------------------------------------
// A block's phase-2 work for a batch: one flat list of items, sequence by sequence. Sequence b
// holds items first[b] .. first[b + 1] - 1: the 16-key tiles of its cached keys [k0[b], k_end[b])
// of this block's range in key order (none when the range is empty); with a sliding window k0[b]
// may be the window's first key, off the tiles, which then start at window_tile_start(k0[b])
// (window_tiles of them). The new token is not here:
// the caller merges its state with the blocks' (attention_block.cu). All arrays in shared memory.
// ---------------------------------------------------------------------------------------------
struct WorkList {
  // k0, k_end [stride] each, then first [B + 1], consecutive: one pointer and a stride instead of
  // a pointer per array keeps attend_items_mma's arguments in registers (with four arrays and four
  // pointers, ptxas passed ~40 bytes of them through the stack, read back with local loads).
  const int* arrays;
  int stride;
  __device__ __forceinline__ int k0(int b) const { return arrays[b]; }
  __device__ __forceinline__ int k_end(int b) const { return arrays[stride + b]; }
  __device__ __forceinline__ int first(int i) const { return arrays[2 * stride + i]; }

  // The sequence of `item`, searching forward from sequence `from` (items only move forward).
  __device__ __forceinline__ int sequence(int item, int from) const {
    while (first(from + 1) <= item) ++from;
    return from;
  }
};

// Tiles per warp in flight. 2 does not fit: even with q's fragments in shared memory ptxas
// spills ~770 bytes per thread at HD=128 (nvcc 13.0), against 28 bytes at 1.
constexpr int kMmaDepth = 1;

// Where warp `warp`'s part of a sequence that its run does not hold whole goes: each of the
// kWarps - 1 boundaries between runs cuts at most one sequence, into a part on its left (slot
// 2·warp: the sequence starts in the run) and one on its right (slot 2·warp - 1: it started
// before the run, `started_before`). A run inside one sequence is the right part of its left
// boundary. The one rule for the warp that writes a part and for the merge that reads it.
__host__ __device__ __forceinline__ int partial_slot(int warp, bool started_before) {
  return started_before ? 2 * warp - 1 : 2 * warp;
}
// Slots the partial states need: two per boundary.
__host__ __device__ constexpr int partial_slots(int warps) { return 2 * (warps - 1); }
// Warp states phase 2 keeps per block: [warps] for the SIMT key loop, [partial_slots] here.
__host__ __device__ constexpr int warp_states(int warps) {
  return warps > partial_slots(warps) ? warps : partial_slots(warps);
}

// The warps' contiguous runs of a work list of `items` items: runs of per = ceil(items / warps)
// items in warp order, so that empty runs come only at the end, past every item. The warps holding
// a sequence's items [f0, f1) are then exactly f0 / per .. (f1 - 1) / per, and the merge needs no
// search. (split_range's balanced runs have the same longest run but may leave an empty run inside
// a sequence.)
struct WarpRuns {
  int items, per;
  __host__ __device__ __forceinline__ WarpRuns(int n_items, int warps)
      : items(n_items), per(n_items > 0 ? (n_items + warps - 1) / warps : 1) {}
  __host__ __device__ __forceinline__ void run(int warp, int& i0, int& i1) const {
    i0 = warp * per < items ? warp * per : items;
    i1 = i0 + per < items ? i0 + per : items;
  }
  __host__ __device__ __forceinline__ int warp_of(int item) const { return item / per; }
  // partial_slot of warp w's part of a sequence whose first item lies in warp wa's run (w >= wa).
  __host__ __device__ __forceinline__ int slot(int w, int wa) const { return partial_slot(w, w != wa); }
};

// One segment of a warp's run: the items [s0, s1) of sequence b, the first at key j0; the
// sequence's cached keys end at k_end. kWindow (CF_ATTN_WINDOW builds): the tiles start at
// window_tile_start(k0), and the first tile's positions < skip lie before the window (skip <= 0
// for every other tile).
template <bool kWindow = false>
struct Segment {
  int b, s0, s1, j0, k_end, skip;
  __device__ __forceinline__ Segment(const WorkList& wl, int item, int from, int i1) {
    b = wl.sequence(item, from);
    s0 = item;
    s1 = min(i1, wl.first(b + 1));
    const int k0 = wl.k0(b);
    if constexpr (kWindow) {
      j0 = window_tile_start(k0) + (item - wl.first(b)) * kTileKeys;
      skip = k0 - j0;
    } else {
      j0 = k0 + (item - wl.first(b)) * kTileKeys;
      skip = 0;
    }
    k_end = wl.k_end(b);
  }
  // Cached keys of the tile at key j (<= 0: past the end).
  __device__ __forceinline__ int valid(int j) const { return min(kTileKeys, k_end - j); }
};

// ---------------------------------------------------------------------------------------------
// This warp's run of the work list (WarpRuns over kWarps warps), on tensor cores, segment by
// segment (a segment: the run's items of one sequence). Within a segment the next tile's address
// is register arithmetic, as in a loop over one sequence; the work list in shared memory is read
// once per segment. The next tile's K and V loads fly while the current one is folded (kMmaDepth
// register sets), across segment boundaries too: a warp's stream of tiles is never drained by a
// barrier. At each segment's end the warp writes its state (split_kv.cuh's per-warp layout, acc
// [G][HD] and (m, l) [G][2]): when the segment is the whole sequence, straight into the block
// state (bacc = bstate + b·G·HD, bml = bstate + B·G·HD + b·G·2); else into slot partial_slot(...)
// of the warp states (acc = wstate [warp_states(kWarps)][G][HD], then (m, l) [..][G][2]), which
// the caller merges in warp order. q comes from res[(head·HD + dim)·B + b] (pre-scaled by qscale).
// qfrag: the block's q fragments, MmaSoftmax::kQfragBytesPerWarp per warp. kWindow: the work list's
// ranges may start off the tiles (Segment; a sliding window). Warp-uniform. Not
// inlined: its registers are allocated on their own instead of on top of everything the fused
// kernel keeps live across its phases, which spilled (ptxas: ~1 KB per thread inlined). Few
// arguments, so that all of them travel in registers.
// ---------------------------------------------------------------------------------------------
template <typename T, int HD, int G, int kWarps, bool kWindow = false>
__device__ __noinline__ void attend_items_mma(const T* kc, const T* vc, KvLayout kv, int g_kv, WorkList wl,
                                              const float* res, int B, float qscale, float* wstate, float* bstate,
                                              uint4* qfrag_block) {
  static_assert(kMmaDepth == 1, "the item loop keeps one tile in flight per warp");
  const int warp = threadIdx.x >> 5, ldr = B;
  int i0, i1;
  WarpRuns(wl.first(B), kWarps).run(warp, i0, i1);
  if (i0 >= i1) return;
  float* slot_acc = wstate;
  float* slot_ml = wstate + warp_states(kWarps) * G * HD;
  float* bacc = bstate;
  float* bml = bstate + B * G * HD;
  uint4* qfrag = qfrag_block + warp * (MmaSoftmax<T, HD, G>::kQfragBytesPerWarp / 16);
  MmaSoftmax<T, HD, G> st;
  KTile<HD> kt;
  VTile<HD> vt;
  Segment<kWindow> seg(wl, i0, 0, i1);
  int j = seg.j0, valid = seg.valid(j), skip = seg.skip;  // the tile in flight (skip: kWindow only)
  {
    const TileRows<HD> r(kv, seg.b, g_kv, j);
    kt.load(kc, r, valid);
    vt.load(vc, r, valid);
  }
  for (;;) {
    const int b = seg.b;
    st.init([&](int g, int d) { return res[(g * HD + d) * ldr + b] * qscale; }, qfrag);
    const bool more = seg.s1 < i1;
    const Segment<kWindow> next = more ? Segment<kWindow>(wl, seg.s1, b, i1) : seg;
    // Fold the tile in flight (every item holds a cached key) and load tile (nb, nj) in its
    // place. `check`: there may be none (nvalid 0: after the run's last item); the hot loop below
    // passes false (inlined: no tests there). nskip: the new tile's keys before the window
    // (kWindow; only a segment's first tile has any): their V pieces are cleared when the tile is
    // folded, where its loads are waited for anyway (right after issuing them, the wait would
    // expose their latency).
    auto step = [&](int nb, int nj, int nvalid, int nskip, bool check) {
      const TileRows<HD> r(kv, nb, g_kv, nj);
      const TileProbs pr = st.template scores<kWindow>(kt, valid, skip);
      if (!check || nvalid > 0) kt.load(kc, r, nvalid);
      if constexpr (kWindow)
        if (skip > 0) vt.clear_before(skip);
      st.accumulate(vt, pr);
      if (!check || nvalid > 0) vt.load(vc, r, nvalid);
      if constexpr (kWindow) skip = nskip;
      j = nj, valid = nvalid;
    };
    // All but the segment's last item: cached tiles, each followed by one of the same sequence.
    for (int it = seg.s0; it + 1 < seg.s1; ++it) {
      step(b, j + kTileKeys, seg.valid(j + kTileKeys), 0, false);
    }
    // The last one, followed by the next segment's first tile.
    step(next.b, next.j0, more ? next.valid(next.j0) : 0, next.skip, true);
    const bool ends = seg.s1 == wl.first(b + 1);  // the segment holds the sequence's last item
    if (ends && seg.s0 == wl.first(b)) {
      st.store(bacc + b * G * HD, bml + b * G * 2);  // the whole sequence
    } else {
      const int slot = partial_slot(warp, seg.s0 > wl.first(b));  // true only for the run's first segment
      st.store(slot_acc + slot * G * HD, slot_ml + slot * G * 2);
    }
    if (!more) break;
    seg = next;
  }
}

}  // namespace attention
}  // namespace clusterfuse
