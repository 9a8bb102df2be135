// Umbrella header for the cluster primitives: DSM plumbing (dsm.cuh), ClusterReduce
// (cluster_reduce.cuh), ClusterGather (cluster_gather.cuh) and the host launch helper
// (launch.cuh). Kernel authors include this one.
#pragma once

#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/cluster_gather.cuh"
#include "clusterfuse/cluster_reduce.cuh"
#include "clusterfuse/dsm.cuh"
#include "clusterfuse/launch.cuh"
