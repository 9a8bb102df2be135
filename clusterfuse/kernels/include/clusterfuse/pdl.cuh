// clusterfuse/pdl.cuh — programmatic dependent launch (PDL) between consecutive fused kernels.
//
// A decode step is a chain attention → FFN → attention → ... in one stream. Launched with
// cudaLaunchAttributeProgrammaticStreamSerialization (clusterfuse::LaunchOptions::programmatic),
// a kernel's blocks may start while its predecessor is still finishing: they set up, issue L2
// prefetches of their first weights (which no kernel writes), and only then wait for the
// predecessor's results. That hides the launch gap and the prologue behind the predecessor's tail
// (its grid barrier and partial sums), where HBM is otherwise idle.
//
// The rule that keeps it correct: before wait_prior_grid() a kernel reads nothing another kernel
// writes (no activations, caches, lengths, workspaces; weights only through prefetch hints, since a
// test may have just written them) and writes no global memory at all. launch_dependents() comes
// after wait_prior_grid(), so at most two kernels of the chain overlap and a kernel's pre-wait part
// never runs beside the kernel two launches back. Both instructions are no-ops without the attribute.
#pragma once

namespace clusterfuse::pdl {

// Blocks until every grid this one depends on has completed and its memory is visible.
__device__ __forceinline__ void wait_prior_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// The next kernel of the stream (if launched with the attribute) may start scheduling its blocks
// once every block of this grid has executed this or exited.
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

}  // namespace clusterfuse::pdl
