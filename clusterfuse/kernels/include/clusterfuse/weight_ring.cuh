// clusterfuse/weight_ring.cuh — a block's GEMVs with their weights streamed by TMA through a
// per-warp ring of shared-memory tiles that runs ahead across phase boundaries.
//
// What it fixes: with register pipelines (gemv.cuh's warp_gemv) a warp holds 8 KB of weight loads
// in flight, 32 KB per 4-warp block; measured on an H200 the attention block's QKV GEMV then
// streams at 2.8 TB/s of 4.1, and every phase boundary (norm, exchanges, attention) drains it.
// Here each warp owns `slots` 4 KB tiles (a tile = one warp step: 16 rows × 128 k) in shared
// memory. Its lane 0 keeps every free slot filled with the warp's next step, one TMA copy each,
// while the warp computes on filled ones. The steps form one sequence over *all* the GEMVs of the
// kernel (a schedule fixed at kernel start, since weights do not depend on activations), so the
// ring refills with the next GEMV's weights before the current one ends and keeps them coming
// while the block does other work: the norm before the first GEMV, the exchanges and attention
// before the O-projection.
//
// Work decomposition and results are exactly gemv.cuh's (same Plan, items, k order, mma and
// k-split reduction), so a kernel moving from block_gemv to ring_block_gemv with the same k
// splits gives bit-identical outputs. Only the weights' path changes: global → shared (TMA) →
// registers.
//
// Protocol (per warp, no cross-warp synchronisation): slot s has an mbarrier full[s] (count 1).
// Lane 0 fills step i into slot i % slots: arrive.expect_tx(full, 4 KB) + one 2-D TMA copy. The
// warp consumes step i after waiting for phase (i / slots) & 1 of full[i % slots], then refills
// that slot once its mma (which reads the loaded registers) has issued and the warp has synced,
// so the copy never overwrites data still being read. At most `slots` steps are in flight.
#pragma once

#include <stdint.h>

#include "clusterfuse/dsm.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/tma.cuh"

namespace clusterfuse {
namespace gemv {

constexpr int kRingStepBytes = kTileRows * kStepK * 2;  // one warp step of 2-byte weights: 4 KB

// One GEMV of the schedule, gemv.cuh's WeightRows as tensor-map coordinates: `nseg` segments of
// `rows` rows, segment s starting at row y0 + s * seg_stride of the matrix behind `map` (2-D
// tensor map, 16-row × 128-column boxes), columns [x0, x0 + K), with gemv.cuh's k split. A row
// tile holding at most 8 rows of its segment is read through `map_half` (8-row boxes), so a
// segment that ends mid-tile costs no bytes of the rows after it (the tile's other 8 rows in
// shared memory are stale: they only feed output rows >= rows, which are never written).
struct RingGemv {
  const CUtensorMap* map;
  const CUtensorMap* map_half;
  int x0, y0, seg_stride, nseg, rows, K, ksplit;
};

// This warp's ring. Every lane holds the same state (warp-uniform control flow). The fill cursor
// advances by additions only: a warp with one warp per scheduler hides no latency, so the
// integer divisions of a from-scratch step → (item, k, row) mapping would sit on the critical
// path of every 4 KB step (measured on an H200: the attention block's QKV GEMV took 48 µs that
// way, 26 µs with this cursor).
struct WarpRing {
  uint32_t tiles;          // shared::cta address of this warp's tiles (128-byte aligned)
  uint64_t* full;          // this warp's mbarriers, one per tile
  const RingGemv* sched;   // the kernel's GEMVs in the order they run (shared memory)
  int ngemv, slots, warp, nwarps;
  int in_flight;           // steps filled and not yet consumed (<= slots)
  int fill_slot;           // tile the next fill goes to
  int use_slot;            // tile the next consumed step is in
  uint32_t use_parity;     // phase parity of use_slot's barrier for that step
  // Fill cursor: GEMV, items left after the current one, the current item's (k part, row tile),
  // its next step's coordinates, how many of its steps are left and whether its tile is half.
  int f_gemv, f_items_left, f_kp, f_rt, f_x, f_y, f_steps_left;
  bool f_half;

  // Shared-memory bytes of the rings of `nwarps` warps with `slots` tiles each, plus their
  // barriers (the tiles first; the caller aligns the start to 128 bytes).
  __host__ __device__ static int bytes(int nwarps, int slots) { return nwarps * slots * (kRingStepBytes + 8); }

  // Valid steps of k part `kp` (those that start below K).
  __device__ static int part_steps(const RingGemv& gm, const Plan& pl, int kp) {
    const int left = gm.K - kp * pl.ksteps_per_part * kStepK;
    const int n = left > 0 ? (left + kStepK - 1) / kStepK : 0;
    return n < pl.ksteps_per_part ? n : pl.ksteps_per_part;
  }

  // Carve this warp's ring out of `base` (128-byte aligned, bytes(nwarps, nslots) long) and
  // initialise its barriers. Every lane of every warp calls it.
  __device__ void init(unsigned char* base, int nslots, const RingGemv* schedule, int n) {
    nwarps = blockDim.x >> 5;
    warp = threadIdx.x >> 5;
    slots = nslots;
    sched = schedule;
    ngemv = n;
    tiles = dsm::smem_addr(base) + warp * slots * kRingStepBytes;
    full = reinterpret_cast<uint64_t*>(base + nwarps * slots * kRingStepBytes) + warp * slots;
    in_flight = fill_slot = use_slot = 0;
    use_parity = 0;
    if ((threadIdx.x & 31) == 0) {
      for (int s = 0; s < slots; ++s) dsm::mbar_init(full + s, 1);
      dsm::fence_mbarrier_init();  // visible to the async proxy (the TMA unit) before any copy
    }
    __syncwarp();
    f_gemv = -1;
    next_gemv();
  }

  // Move the fill cursor to the first step of this warp's next GEMV that has any.
  __device__ void next_gemv() {
    while (++f_gemv < ngemv) {
      const RingGemv& gm = sched[f_gemv];
      const Plan pl(gm.nseg, gm.rows, gm.K, gm.ksplit);
      if (pl.items <= warp) continue;
      f_items_left = (pl.items - warp + nwarps - 1) / nwarps - 1;
      f_kp = warp / pl.row_tiles, f_rt = warp - f_kp * pl.row_tiles;
      if (start_item(gm, pl)) return;
    }
  }

  // Point the cursor at the current item's first step; false when no item of this GEMV is left.
  __device__ bool start_item(const RingGemv& gm, const Plan& pl) {
    for (;;) {
      f_steps_left = part_steps(gm, pl, f_kp);
      f_x = gm.x0 + f_kp * pl.ksteps_per_part * kStepK;
      const int seg = f_rt / pl.tiles_per_seg, row = (f_rt - seg * pl.tiles_per_seg) * kTileRows;
      f_y = gm.y0 + seg * gm.seg_stride + row;
      f_half = gm.rows - row <= kTileRows / 2;
      if (f_steps_left > 0) return true;
      if (!advance_item(pl)) return false;
    }
  }

  __device__ bool advance_item(const Plan& pl) {
    if (f_items_left == 0) return false;
    --f_items_left;
    f_rt += nwarps;
    while (f_rt >= pl.row_tiles) f_rt -= pl.row_tiles, ++f_kp;
    return true;
  }

  // Fill free tiles with the next steps of the schedule (lane 0 issues; all lanes call).
  __device__ void fill() {
    while (in_flight < slots && f_gemv < ngemv) {
      if ((threadIdx.x & 31) == 0) {
        const RingGemv& gm = sched[f_gemv];
        dsm::mbar_arrive_expect_tx(full + fill_slot, f_half ? kRingStepBytes / 2 : kRingStepBytes);
        tma::load_2d(tiles + fill_slot * kRingStepBytes, f_half ? gm.map_half : gm.map, f_x, f_y, full + fill_slot);
      }
      ++in_flight;
      if (++fill_slot == slots) fill_slot = 0;
      f_x += kStepK;
      if (--f_steps_left == 0) {
        const RingGemv& gm = sched[f_gemv];
        const Plan pl(gm.nseg, gm.rows, gm.K, gm.ksplit);
        if (!(advance_item(pl) && start_item(gm, pl))) next_gemv();
      }
    }
  }

  // Wait for the next step's tile; returns its shared::cta address.
  __device__ __forceinline__ uint32_t acquire() {
    dsm::mbar_wait(full + use_slot, use_parity);
    return tiles + use_slot * kRingStepBytes;
  }

  // The step's fragments are in registers (its mma has issued): hand the tile back and refill.
  __device__ __forceinline__ void release() {
    __syncwarp();
    if (++use_slot == slots) use_slot = 0, use_parity ^= 1u;
    --in_flight;
    fill();
  }
};

// Warp-level driver over the ring for GEMV `index` of the schedule (the same item order as
// warp_gemv): waits for each step's tile, reads this lane's fragments from it, runs the mma, hands
// the tile back to the ring (which refills it). Steps must be consumed in schedule order.
template <typename T, int NT, class Sink>
__device__ __forceinline__ void ring_warp_gemv(WarpRing& ring, int index, const Plan& pl, const T* xs, int ldx,
                                               int B, Sink&& sink) {
  const RingGemv& gm = ring.sched[index];
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int item = ring.warp; item < pl.items; item += ring.nwarps) {
    const int kp = item / pl.row_tiles, rt = item - kp * pl.row_tiles;
    const int nsteps = WarpRing::part_steps(gm, pl, kp);
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    int k = kp * pl.ksteps_per_part * kStepK + t * kChunkElems;
    for (int s = 0; s < nsteps; ++s, k += kStepK) {
      // The tile is row-major [16][128]: this lane's rows g and g+8, its 16-byte chunks at
      // k = t*8 + u*32, the same k map as load_stage (so x is read the same way).
      const uint32_t tile = ring.acquire();
      Stage st;
#pragma unroll
      for (int u = 0; u < kChunksPerRow; ++u) {
        const uint32_t col = (t * kChunkElems + u * 4 * kChunkElems) * 2;
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(st.a[u].x), "=r"(st.a[u].y), "=r"(st.a[u].z), "=r"(st.a[u].w)
                     : "r"(tile + g * kStepK * 2 + col));
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(st.b[u].x), "=r"(st.b[u].y), "=r"(st.b[u].z), "=r"(st.b[u].w)
                     : "r"(tile + (g + 8) * kStepK * 2 + col));
      }
      mma_stage<T, NT>(acc, st, xs, ldx, B, k, 0, gm.K, g);
      ring.release();
    }
    sink(rt, kp, acc);
  }
}

// Block-level GEMV `index` of the schedule through the ring: block_gemv's contract (epi once per
// row < rows and n < B, deterministic k-split reduction in `part`), weights from the ring.
template <typename T, int NT, class Epi>
__device__ __forceinline__ void ring_block_gemv(WarpRing& ring, int index, const T* xs, int ldx, int B, float* part,
                                                Epi&& epi) {
  const RingGemv& gm = ring.sched[index];
  const Plan pl(gm.nseg, gm.rows, gm.K, gm.ksplit);
  block_gemv_reduce<NT>(
      pl, gm.rows, gm.ksplit, B, part, [&](auto&& sink) { ring_warp_gemv<T, NT>(ring, index, pl, xs, ldx, B, sink); },
      epi);
}

}  // namespace gemv
}  // namespace clusterfuse
