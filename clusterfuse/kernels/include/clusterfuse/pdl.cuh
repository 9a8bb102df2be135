// clusterfuse/pdl.cuh — programmatic dependent launch (PDL) between consecutive fused kernels.
//
// A decode step is a chain attention → FFN → attention → ... in one stream. Launched with
// cudaLaunchAttributeProgrammaticStreamSerialization (clusterfuse::LaunchOptions::programmatic),
// a kernel's blocks may start while its predecessor is still finishing: they set up, issue L2
// prefetch hints for their first weights, and only then wait for the predecessor's results. That
// hides the launch gap and the prologue behind the predecessor's tail. It cannot overlap more:
// an attention block and an FFN block do not fit on one SM together (registers), so a successor's
// blocks start only on SMs the predecessor has left (bench/results/programmatic_launch_h200.md).
//
// The rule that keeps it correct: before wait_prior_grid() a kernel reads nothing another kernel
// writes (no activations, caches, lengths, workspaces; weights only through prefetch hints, which
// consume nothing, since a caller may have rewritten them just before) and writes no global memory
// but its own profiling timeline. launch_dependents() comes after wait_prior_grid(), so at most
// two kernels of the chain overlap and a kernel's pre-wait part never runs beside the kernel two
// launches back. Both instructions are no-ops without the attribute.
#pragma once

namespace clusterfuse::pdl {

// Blocks until every grid this one depends on has completed and its memory is visible.
__device__ __forceinline__ void wait_prior_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// The next kernel of the stream (if launched with the attribute) may start scheduling its blocks
// once every block of this grid has executed this or exited.
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

}  // namespace clusterfuse::pdl
