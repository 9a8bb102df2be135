// clusterfuse/gemv.cuh — small-batch GEMV (y[n][row] = sum_k W[row][k] * x[n][k], n < 16) on the
// tensor cores, streaming a row-major weight matrix from HBM with 16-byte loads and many loads in
// flight. Reused by every fused block (FFN gate/up/down, attention QKV/O).
//
// Why mma.sync for a GEMV: at batch 16 a CUDA-core GEMV needs 16 FMAs + conversions per weight
// element, more instruction issue than an SM has at HBM speed. One m16n8k16 mma consumes 256 weight
// elements for all 8 (or 16 with two mmas) vectors in one instruction, so the loop is pure loads.
//
// The k-permutation trick: a dot product does not care in which order k is summed, so each thread
// loads one 16-byte chunk (8 consecutive k) of a weight row and the matching 16-byte chunk of x, and
// feeds those registers to the mma as if they were the fragment's logical k slots. Lane (g = lane/4,
// t = lane%4) loads row g and row g+8 of a 16-row tile and x of vector n = g, all at k offset t*8;
// registers .x/.y feed the first mma, .z/.w the second. A and B use the same physical→logical k
// map, so the products are exact. Result: fully coalesced 16-byte loads straight into fragments,
// no shared-memory staging of weights and no ldmatrix.
//
// Work decomposition (deterministic): the rows are cut into 16-row tiles ("row tiles"), K into
// `ksplit` equal parts; an item = (row tile, k part). Warp w of W processes items w, w+W, ... as one
// flat, software-pipelined sequence of steps (a step = 16 rows × 128 k = 4 KB of weights), with
// depth-1 steps of loads in flight ahead of the mma (by default kStages = 3: 2 × 4 KB per warp;
// 64 KB per 8-warp block). A kernel may ask for another depth (the attention block runs 2).
// With ksplit > 1 the per-item fp32 fragments go to shared memory and are summed in k-part order
// (fixed), so repeated runs are bit-identical.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace clusterfuse {
namespace gemv {

constexpr int kTileRows = 16;                         // mma M
constexpr int kChunkElems = 8;                        // 2-byte elements per 16-byte load
constexpr int kChunksPerRow = 4;                      // 16-byte chunks per row per thread per step (U)
constexpr int kStepK = 4 * kChunksPerRow * kChunkElems;  // k covered by one warp step: 128
constexpr int kStages = 3;                            // default register pipeline depth (steps)

// Row stride (elements) for an x / activation tile in shared memory holding k columns: 16-byte
// aligned rows, and a stride ≡ 64 bytes (mod 128) so the two vectors a quarter-warp reads land in
// different banks.
__host__ __device__ constexpr int smem_ld(int k) { return ((k + 63) / 64) * 64 + 32; }

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

// Streaming 16-byte weight load: read once, so skip L1. No L2::256B over-fetch hint: a tile's
// rows may start mid-line (e.g. W_down column slices cut at 16 bytes), and a neighbour's bytes
// fetched here could be fetched from HBM a second time. A warp step reads 256 contiguous bytes
// per row anyway.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Asynchronous L2 prefetch of `bytes` (multiple of 16) at a 16-byte aligned address: keeps HBM
// busy across phase boundaries without holding registers.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
// The 128-byte line holding p into L2 (a plain load-unit prefetch: no TMA operation per line).
__device__ __forceinline__ void prefetch_line_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------
// The weight operand: up to kMaxSegs row-major segments of `rows` rows each, stacked (e.g. the gate
// rows and the up rows of one I-slice, or Q/K/V rows). Output row index = seg * rows + row.
// Requirements: ldw and K multiples of 8 elements, segment bases 16-byte aligned.
// ---------------------------------------------------------------------------------------------
constexpr int kMaxSegs = 4;

template <typename T>
struct WeightRows {
  using Elem = T;
  const T* seg[kMaxSegs];
  int nseg;  // 1..kMaxSegs
  int rows;  // rows per segment (may be 0)
  int ldw;   // elements between consecutive rows
  int K;     // columns to reduce over

  __host__ __device__ int out_rows() const { return rows; }  // block_gemv_reduce's rows per segment
};

// A second kind of weight operand: up to kMaxPieces row-major pieces of different row counts,
// every one but the last a whole number of 16-row tiles (e.g. a block's share of a KV head group's
// Q, K and V rows, which lie in three places of W_qkv). One GEMV over the pieces keeps one
// pipeline streaming across them, where a GEMV per piece drains and restarts it at each piece
// (a block with two pieces took 8-10 µs longer than one with one at batch 16, Llama-3-8B on the
// H100; bench/results/qkv_pieces_h100.md). To the reduction it is one segment: output row =
// tile * 16 + row, the pieces' rows in order.
constexpr int kMaxPieces = 3;

template <typename T>
struct WeightPieces {
  using Elem = T;
  const T* seg[kMaxPieces];  // the pieces' first rows
  int rows[kMaxPieces];      // rows per piece; 0 for the unused ones, which come last
  int ldw;
  int K;

  __host__ __device__ int out_rows() const { return rows[0] + rows[1] + rows[2]; }
};

// Static shape of the item list of one block-level GEMV.
struct Plan {
  int tiles_per_seg, row_tiles, ksteps_per_part, items;
  bool whole_steps;  // every k part is whole steps inside K: warp_gemv's unmasked path applies

  __host__ __device__ static int ceil_div(int a, int b) { return (a + b - 1) / b; }

  __host__ __device__ Plan(int nseg, int rows, int K, int ksplit) {
    tiles_per_seg = ceil_div(rows, kTileRows);
    row_tiles = nseg * tiles_per_seg;
    ksteps_per_part = ceil_div(ceil_div(K, kStepK), ksplit);
    items = row_tiles * ksplit;
    whole_steps = ksteps_per_part * ksplit * kStepK == K;
  }
  template <typename T>
  __host__ __device__ Plan(const WeightRows<T>& w, int ksplit) : Plan(w.nseg, w.rows, w.K, ksplit) {}
  template <typename T>
  __host__ __device__ Plan(const WeightPieces<T>& w, int ksplit) : Plan(1, w.out_rows(), w.K, ksplit) {}
};

// Shared-memory floats the partial buffer needs (0 when ksplit == 1: fragments go straight out).
template <int NT>
__host__ __device__ inline int partial_floats(int row_tiles, int ksplit) {
  return ksplit > 1 ? row_tiles * ksplit * kTileRows * 8 * NT : 0;
}

// Host helper: the largest per-warp step count of a GEMV with this k split (what it costs when
// every warp streams at the same rate).
inline int ksplit_cost(int row_tiles, int K, int warps, int ksplit) {
  return Plan::ceil_div(row_tiles * ksplit, warps) * Plan::ceil_div(Plan::ceil_div(K, kStepK), ksplit);
}

// Host helper: the k split in 1..8 that minimises ksplit_cost (ties → fewer parts), bounded by
// the partial buffer `max_part_floats`. A split into whole steps (warp_gemv's
// unmasked path) is preferred while it costs at most a quarter more steps than the best split.
template <int NT>
inline int choose_ksplit(int row_tiles, int K, int warps, int max_part_floats) {
  const int ksteps = Plan::ceil_div(K, kStepK);
  int best = 1, best_cost = 1 << 30, whole = 0, whole_cost = 1 << 30;
  for (int ks = 1; ks <= 8 && ks <= ksteps; ++ks) {
    if (ks > 1 && partial_floats<NT>(row_tiles, ks) > max_part_floats) break;
    const int cost = ksplit_cost(row_tiles, K, warps, ks);
    if (cost < best_cost) best = ks, best_cost = cost;
    if (Plan(1, kTileRows, K, ks).whole_steps && cost < whole_cost) whole = ks, whole_cost = cost;
  }
  return whole > 0 && 4 * whole_cost <= 5 * best_cost ? whole : best;
}

// Where one item's weights live for this lane: rows g and g+8 of the item's tile, and its k range.
template <typename T>
struct ItemGeom {
  const T* row0;  // row g   (nullptr when out of range)
  const T* row1;  // row g+8 (nullptr when out of range)
  int k0;         // first k of the item's part, plus this lane's t*8
  int rt, kp;     // row tile, k part
  const T* base;  // the item's segment
  int r;          // row g's index inside the segment
  int piece_rows; // the rows of the item's segment (WeightRows) or piece (WeightPieces)

  __device__ __forceinline__ ItemGeom(const WeightRows<T>& w, const Plan& pl, int item, int g, int t) {
    piece_rows = w.rows;
    kp = item / pl.row_tiles;
    rt = item - kp * pl.row_tiles;
    const int seg = rt / pl.tiles_per_seg;
    r = (rt - seg * pl.tiles_per_seg) * kTileRows + g;
    base = w.seg[0];
#pragma unroll
    for (int s = 1; s < kMaxSegs; ++s) base = (seg == s) ? w.seg[s] : base;  // no local-memory index
    set_rows_and_k(w.ldw, pl, t);
  }

  // The piece holding row tile rt: the last one whose first tile is <= rt (selects, no index).
  __device__ __forceinline__ ItemGeom(const WeightPieces<T>& w, const Plan& pl, int item, int g, int t) {
    kp = item / pl.row_tiles;
    rt = item - kp * pl.row_tiles;
    base = w.seg[0], piece_rows = w.rows[0], r = rt * kTileRows + g;
    int t0 = 0;
#pragma unroll
    for (int i = 0; i < kMaxPieces - 1; ++i) {
      t0 += (w.rows[i] + kTileRows - 1) / kTileRows;
      if (w.rows[i + 1] > 0 && rt >= t0) base = w.seg[i + 1], piece_rows = w.rows[i + 1], r = (rt - t0) * kTileRows + g;
    }
    set_rows_and_k(w.ldw, pl, t);
  }

  // Row g + dr at the item's first k, or the segment's last row where g + dr lies beyond it (the
  // unmasked path: that row's outputs are never stored).
  __device__ __forceinline__ const T* clamped(const WeightRows<T>& w, int dr) const {
    return base + (size_t)min(r + dr, w.rows - 1) * w.ldw + k0;
  }
  __device__ __forceinline__ const T* clamped(const WeightPieces<T>& w, int dr) const {
    return base + (size_t)min(r + dr, piece_rows - 1) * w.ldw + k0;
  }

 private:
  // Both constructors' tail, once base, r and piece_rows are known.
  __device__ __forceinline__ void set_rows_and_k(int ldw, const Plan& pl, int t) {
    row0 = r < piece_rows ? base + (size_t)r * ldw : nullptr;
    row1 = r + 8 < piece_rows ? base + (size_t)(r + 8) * ldw : nullptr;
    k0 = kp * pl.ksteps_per_part * kStepK + t * kChunkElems;
  }
};

struct Stage {
  uint4 a[kChunksPerRow];  // row g
  uint4 b[kChunksPerRow];  // row g+8
};

template <typename T>
__device__ __forceinline__ void load_stage(Stage& st, const ItemGeom<T>& ig, int kstep, int K) {
#pragma unroll
  for (int u = 0; u < kChunksPerRow; ++u) {
    const int k = ig.k0 + kstep * kStepK + u * 4 * kChunkElems;
    const bool kin = k < K;
    st.a[u] = (kin && ig.row0) ? ld_stream(ig.row0 + k) : make_uint4(0, 0, 0, 0);
    st.b[u] = (kin && ig.row1) ? ld_stream(ig.row1 + k) : make_uint4(0, 0, 0, 0);
  }
}

// acc[nt] += W_tile(step) · x[n = nt*8 + g] over the step's 128 k.
template <typename T, int NT>
__device__ __forceinline__ void mma_stage(float (&acc)[NT][4], const Stage& st, const T* xs, int ldx,
                                          int B, int k0, int kstep, int K, int g) {
#pragma unroll
  for (int u = 0; u < kChunksPerRow; ++u) {
    const int k = k0 + kstep * kStepK + u * 4 * kChunkElems;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = nt * 8 + g;
      // x beyond K or beyond the batch is zero: a garbage NaN there would poison every row.
      const uint4 x = (k < K && n < B) ? *reinterpret_cast<const uint4*>(xs + n * ldx + k)
                                       : make_uint4(0, 0, 0, 0);
      Mma<T>::run(acc[nt], st.a[u].x, st.b[u].x, st.a[u].y, st.b[u].y, x.x, x.y);
      Mma<T>::run(acc[nt], st.a[u].z, st.b[u].z, st.a[u].w, st.b[u].w, x.z, x.w);
    }
  }
}

// Issue L2 prefetches of the first `steps` steps of this warp's first item (lanes 0..15, one row
// each). Call before a phase boundary so HBM keeps streaming while the block waits.
template <class W>
__device__ __forceinline__ void warp_prefetch_first(const W& w, int ksplit, int warp, int steps) {
  using T = typename W::Elem;
  const Plan pl(w, ksplit);
  const int lane = threadIdx.x & 31;
  if (warp >= pl.items || lane >= kTileRows) return;
  const ItemGeom<T> ig(w, pl, warp, lane & 7, 0);
  const T* row = lane < 8 ? ig.row0 : ig.row1;
  const int k_end = min(w.K, ig.k0 + min(steps, pl.ksteps_per_part) * kStepK);
  if (row && k_end > ig.k0) prefetch_l2(row + ig.k0, (uint32_t)(k_end - ig.k0) * sizeof(T));
}

// warp_gemv when every k part is whole steps inside K (Plan::whole_steps), as for every hidden
// size of a real model. Nothing is masked: no k falls outside K, a lane whose weight row lies
// beyond the segment's rows reads the segment's last row, and one whose vector lies beyond the
// batch reads vector B-1. An output row depends only on its weight row and an output column only
// on its vector, so those lanes only fill accumulator entries that no epilogue stores, and all
// they read are real, finite values. A step is then 8 loads at fixed offsets from two row
// pointers, 4 shared-memory loads at fixed offsets from one x pointer per batch tile, and 8 mma
// alternating between kSets accumulator sets, so that each mma does
// not wait for the one before (at one warp per scheduler no other warp hides that latency). ncu
// of the attention block before this path (H200): 7.6 cycles per issued instruction per warp, a
// quarter of them waiting on fixed-latency dependencies. The sets are summed in a fixed order:
// deterministic.
template <typename T, int NT, int kDepth, class W, class Sink>
__device__ __forceinline__ void warp_gemv_whole_steps(const W& w, const Plan& pl, const T* xs, int ldx, int B,
                                                      int warp, int nwarps, Sink& sink) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int my_items = pl.items > warp ? (pl.items - warp + nwarps - 1) / nwarps : 0;
  const int total = my_items * pl.ksteps_per_part;
  if (total == 0) return;
  const T* xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xrow[nt] = xs + (size_t)min(nt * 8 + g, B - 1) * ldx + t * kChunkElems;

  // Load side: this lane's two row pointers at the next step to load.
  const T *la, *lb;
  int l_item = 0, l_ks = 0;
  auto locate = [&](int item) {
    const ItemGeom<T> ig(w, pl, item, g, t);
    la = ig.clamped(w, 0);
    lb = ig.clamped(w, 8);
  };
  locate(warp);
  auto load = [&](Stage& st) {
#pragma unroll
    for (int u = 0; u < kChunksPerRow; ++u) {
      st.a[u] = ld_stream(la + u * 4 * kChunkElems);
      st.b[u] = ld_stream(lb + u * 4 * kChunkElems);
    }
    la += kStepK, lb += kStepK;
    if (++l_ks == pl.ksteps_per_part) {
      l_ks = 0;
      if (++l_item < my_items) locate(warp + l_item * nwarps);
    }
  };

  // Compute side: the current item and this step's k offset into x.
  int c_item = 0, c_ks = 0, c_item_id = warp;
  int cx = (warp / pl.row_tiles) * pl.ksteps_per_part * kStepK;
  // Two sets: more make shorter chains of dependent mma for 4·NT more registers a set; 4 measured
  // neutral or slower on an H200 (attention 64.3 -> 66.6 us at Llama-2-7B S=1K;
  // bench/results/gemv_whole_steps_h200.md).
  constexpr int kSets = 2;
  float acc[kSets][NT][4];
#pragma unroll
  for (int h = 0; h < kSets; ++h)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[h][nt][0] = acc[h][nt][1] = acc[h][nt][2] = acc[h][nt][3] = 0.f;
  auto consume = [&](const Stage& st) {
#pragma unroll
    for (int u = 0; u < kChunksPerRow; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 x = *reinterpret_cast<const uint4*>(xrow[nt] + cx + u * 4 * kChunkElems);
        Mma<T>::run(acc[(2 * u) % kSets][nt], st.a[u].x, st.b[u].x, st.a[u].y, st.b[u].y, x.x, x.y);
        Mma<T>::run(acc[(2 * u + 1) % kSets][nt], st.a[u].z, st.b[u].z, st.a[u].w, st.b[u].w, x.z, x.w);
      }
    }
    cx += kStepK;
    if (++c_ks == pl.ksteps_per_part) {
      float sum[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v = acc[0][nt][i];
#pragma unroll
          for (int h = 1; h < kSets; ++h) v += acc[h][nt][i];  // fixed order: deterministic
          sum[nt][i] = v;
#pragma unroll
          for (int h = 0; h < kSets; ++h) acc[h][nt][i] = 0.f;
        }
      const int kp = c_item_id / pl.row_tiles;
      sink(c_item_id - kp * pl.row_tiles, kp, sum);
      c_ks = 0;
      if (++c_item < my_items) {
        c_item_id = warp + c_item * nwarps;
        cx = (c_item_id / pl.row_tiles) * pl.ksteps_per_part * kStepK;
      }
    }
  };

  Stage st[kDepth];
#pragma unroll
  for (int s = 0; s < kDepth - 1; ++s)
    if (s < total) load(st[s]);
  for (int s = 0; s < total; s += kDepth) {
#pragma unroll
    for (int j = 0; j < kDepth; ++j) {
      if (s + j < total) {
        // Refill the buffer consumed last step with the step kDepth-1 ahead.
        if (s + j + kDepth - 1 < total) load(st[(j + kDepth - 1) % kDepth]);
        consume(st[j]);
      }
    }
  }
}

// Warp-level driver: runs this warp's items and hands each finished item's accumulators to
// `sink(rt, kp, acc)`. acc[nt][0..1] = rows g, cols nt*8+2t+{0,1}; acc[nt][2..3] = row g+8.
// kDepth: steps whose registers the pipeline holds (kDepth - 1 of them in flight). With
// shapes whose k parts are whole steps take the unmasked path above: on an H200 it made the
// attention block 70.8 -> 64.5 us (Llama-2-7B S=1K, cluster 4) and 56.1 -> 51.7 (Llama-3-8B, cluster
// 16), the FFN 81.7 -> 79.5 / 102.7 -> 100.1; outlining either loop (its own function, its own
// registers) was slower (bench/results/gemv_whole_steps_h200.md).
template <typename T, int NT, int kDepth, class W, class Sink>
__device__ __forceinline__ void warp_gemv_masked(const W& w, const Plan& pl, const T* xs, int ldx, int B, int warp,
                                                 int nwarps, Sink& sink);

template <typename T, int NT, int kDepth = kStages, class W, class Sink>
__device__ __forceinline__ void warp_gemv(const W& w, const Plan& pl, const T* xs, int ldx, int B, int warp,
                                          int nwarps, Sink&& sink) {
  static_assert(kDepth >= 2 && kDepth <= 8, "GEMV pipeline depth must be in 2..8");
  if (pl.whole_steps) {
    warp_gemv_whole_steps<T, NT, kDepth>(w, pl, xs, ldx, B, warp, nwarps, sink);
    return;
  }
  warp_gemv_masked<T, NT, kDepth>(w, pl, xs, ldx, B, warp, nwarps, sink);
}

// The general warp loop: k, rows and vectors masked per load.
template <typename T, int NT, int kDepth, class W, class Sink>
__device__ __forceinline__ void warp_gemv_masked(const W& w, const Plan& pl, const T* xs, int ldx, int B, int warp,
                                                 int nwarps, Sink& sink) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int my_items = pl.items > warp ? (pl.items - warp + nwarps - 1) / nwarps : 0;
  const int total = my_items * pl.ksteps_per_part;
  if (total == 0) return;

  // Two cursors over the flat step sequence: the load side runs kDepth-1 steps ahead.
  int l_item = 0, l_ks = 0;
  ItemGeom<T> lg(w, pl, warp, g, t);
  auto advance_load = [&]() {
    if (++l_ks == pl.ksteps_per_part) {
      l_ks = 0;
      if (++l_item < my_items) lg = ItemGeom<T>(w, pl, warp + l_item * nwarps, g, t);
    }
  };
  Stage st[kDepth];
#pragma unroll
  for (int s = 0; s < kDepth - 1; ++s) {
    if (s < total) load_stage(st[s], lg, l_ks, w.K);
    advance_load();
  }

  int c_item = 0, c_ks = 0;
  ItemGeom<T> cg(w, pl, warp, g, t);
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int s = 0; s < total; s += kDepth) {
#pragma unroll
    for (int j = 0; j < kDepth; ++j) {
      if (s + j < total) {
        // Refill the buffer consumed last step with the step kDepth-1 ahead.
        if (s + j + kDepth - 1 < total) load_stage(st[(j + kDepth - 1) % kDepth], lg, l_ks, w.K);
        advance_load();
        mma_stage<T, NT>(acc, st[j], xs, ldx, B, cg.k0, c_ks, w.K, g);
        if (++c_ks == pl.ksteps_per_part) {
          sink(cg.rt, cg.kp, acc);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
          c_ks = 0;
          if (++c_item < my_items) cg = ItemGeom<T>(w, pl, warp + c_item * nwarps, g, t);
        }
      }
    }
  }
}

// The block level of a GEMV, whatever feeds the warps: `run_warp(sink)` runs this warp's items
// (Plan `pl`, items warp, warp + nwarps, ...) and hands each finished one to sink(rt, kp, acc).
// Calls epi(row, n, value) exactly once for every row < nseg*rows and n < B (row = seg*rows +
// row-in-segment). With ksplit > 1 the items' fragments go to `part` (shared memory of
// partial_floats<NT>(row_tiles, ksplit) floats) and are summed in k-part order after a
// __syncthreads: deterministic. All threads of the block must call it; the caller syncs before
// reading what epi wrote to shared memory.
template <int NT, class RunWarp, class Epi>
__device__ __forceinline__ void block_gemv_reduce(const Plan& pl, int rows, int ksplit, int B, float* part,
                                                  RunWarp&& run_warp, Epi&& epi) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  constexpr int kTileFloats = kTileRows * 8 * NT;

  if (ksplit == 1) {
    run_warp([&](int rt, int, const float(&acc)[NT][4]) {
      const int seg = rt / pl.tiles_per_seg;
      const int r = (rt - seg * pl.tiles_per_seg) * kTileRows + g;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = r + (i >> 1) * 8, n = nt * 8 + 2 * t + (i & 1);
          if (row < rows && n < B) epi(seg * rows + row, n, acc[nt][i]);
        }
    });
    return;
  }

  // Partial of item (rt, kp) → part[(kp * row_tiles + rt) * kTileFloats + r * 8NT + n].
  run_warp([&](int rt, int kp, const float(&acc)[NT][4]) {
    float* dst = part + (size_t)(kp * pl.row_tiles + rt) * kTileFloats;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) dst[(g + (i >> 1) * 8) * 8 * NT + nt * 8 + 2 * t + (i & 1)] = acc[nt][i];
  });
  __syncthreads();
  for (int e = threadIdx.x; e < pl.row_tiles * kTileFloats; e += blockDim.x) {
    const int rt = e / kTileFloats, rem = e - rt * kTileFloats;
    const int r = rem / (8 * NT), n = rem - r * 8 * NT;
    const int seg = rt / pl.tiles_per_seg;
    const int row = (rt - seg * pl.tiles_per_seg) * kTileRows + r;
    if (row >= rows || n >= B) continue;
    float v = 0.f;
    for (int kp = 0; kp < ksplit; ++kp) v += part[(size_t)kp * pl.row_tiles * kTileFloats + e];
    epi(seg * rows + row, n, v);
  }
}

// Block-level GEMV over weights loaded straight from global memory into registers (warp_gemv,
// kDepth steps deep), with the deterministic k-split reduction of block_gemv_reduce.
template <typename T, int NT, int kDepth = kStages, class W, class Epi>
__device__ __forceinline__ void block_gemv(const W& w, int ksplit, const T* xs, int ldx, int B, float* part,
                                           Epi&& epi) {
  const Plan pl(w, ksplit);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  block_gemv_reduce<NT>(
      pl, w.out_rows(), ksplit, B, part,
      [&](auto&& sink) { warp_gemv<T, NT, kDepth>(w, pl, xs, ldx, B, warp, nwarps, sink); }, epi);
}

}  // namespace gemv
}  // namespace clusterfuse
