// clusterfuse/step/timeline.cuh — the persistent decode step's profiling timeline (its timeline
// build, CF_STEP_TIMELINE=1; bench/step_timeline.py reads it). Thread 0 of every block writes into
// the block's row of an int64 buffer: %globaltimer at the kernel's start and end (to convert its
// clocks to ns), its SM, clock64 at the start, then clock64 at every phase boundary of every
// layer, in the order the phases run. A stamp of a phase the block did not run in a layer (its
// cluster had no KV head group or no FFN slice) stays as the host wrote it: 0. Stamps are taken
// after the block-wide (or cluster-, grid-wide) synchronisation that ends a phase, where it has one.
#pragma once

#include <stdint.h>

namespace clusterfuse {
namespace step {

constexpr int kTimelineHead = 4;  // [globaltimer at start, at end, SM id, clock64 at start]

// One layer's stamps in a block's row, each at the end of the phase it names.
enum LayerStamp : int {
  // the attention program of the cluster's first KV head group (attention::Stamp kNormed..kProjected)
  kAttnNormed, kAttnQkv, kAttnExchanged, kAttnAppended, kAttnAttended, kAttnMerged, kAttnProjected,
  kAttnDone,       // every KV head group of the cluster, each followed by a cluster wait
  kMidBarrier,     // grid barrier: every group's partial written
  kMidSum,         // mid = x + Σ partials, this block's slice of [B, H]
  kMidSumBarrier,  // grid barrier: mid complete
  // the FFN program of the cluster's first slice (ffn::Stamp)
  kFfnNormed, kFfnGateUp, kFfnGathered, kFfnDown,
  kFfnDone,        // every FFN slice of the cluster, each followed by a cluster wait
  kOutBarrier,     // grid barrier: every slice's partial written
  kOutSum,         // out = mid + Σ partials, this block's slice
  kLayerEnd,       // grid barrier before the next layer (the last layer has none)
  kLayerStamps
};

// Records clock64 in slot `s` of `stamps` (one layer of this block's row) when the build keeps a
// timeline and the slot array is given; nothing otherwise.
template <bool kOn>
__device__ __forceinline__ void stamp(unsigned long long* stamps, int s) {
  if constexpr (kOn) {
    if (threadIdx.x == 0 && stamps) stamps[s] = clock64();
  }
}

// The kernel's start / end stamps of this block's row (`row`: its first slot).
template <bool kOn>
__device__ __forceinline__ void stamp_kernel(unsigned long long* row, bool start) {
  if constexpr (kOn) {
    if (threadIdx.x != 0 || !row) return;
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    row[start ? 0 : 1] = ns;
    if (start) {
      unsigned int sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      row[2] = sm;
      row[3] = clock64();
    }
  }
}

}  // namespace step
}  // namespace clusterfuse
