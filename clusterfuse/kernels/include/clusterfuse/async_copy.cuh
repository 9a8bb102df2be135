// clusterfuse/async_copy.cuh — per-thread asynchronous 16-byte copies global → shared memory
// (cp.async, sm_80+), for streams whose rows are too small or too scattered for TMA boxes: the
// KV cache of one decode token, read key row by key row through a block table.
//
// Why: a copy in flight holds shared memory, not registers. A register pipeline can keep only as
// many loads outstanding as the registers left after the compute (the tensor-core split-KV loop:
// one 16-key tile per warp); a shared-memory pipeline of S stages keeps S of them in flight while
// the thread waits for the oldest.
//
// Each thread reads back only what it copied itself, so waiting on its own groups
// (cp.async.wait_group) is all the synchronisation there is; no barrier, no mbarrier.
#pragma once

#include <stdint.h>

#include "clusterfuse/dsm.cuh"

namespace clusterfuse {
namespace async_copy {

// Copy 16 bytes at `src` (16-byte aligned, global) to `dst` (16-byte aligned, shared). Skips L1:
// every byte of the stream is read once.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dsm::smem_addr(dst)), "l"(src) : "memory");
}

// Close the copies issued since the last commit into one group (an empty group is legal).
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Wait until at most `pending` of this thread's groups are still in flight. The instruction takes
// an immediate, hence the switch over the values a pipeline of up to 8 stages needs; `pending` is
// warp-uniform, so the branch does not diverge.
__device__ __forceinline__ void wait_pending(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
  }
}

}  // namespace async_copy
}  // namespace clusterfuse
