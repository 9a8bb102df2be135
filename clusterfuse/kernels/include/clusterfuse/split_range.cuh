// clusterfuse/split_range.cuh — the near-equal split of a range that every fused kernel uses to
// give each block, cluster or thread its share (rows of a weight, keys of a sequence, elements of
// the output), identically on the host and the device.
#pragma once

namespace clusterfuse {

// [lo, hi) of part `i` (0 <= i < parts) when n_units units of `unit` elements are split into
// `parts` runs: part i holds units floor(i n / parts) up to floor((i + 1) n / parts).
// Kernel prologues call this on their critical path before the first load, so the products are
// divided in 32 bits wherever they fit (every real shape): the 64-bit division is a long
// software routine, the 32-bit one a few instructions. Both give the same result.
__host__ __device__ __forceinline__ void split_range(int n_units, int parts, int i, int unit, int& lo, int& hi) {
  const unsigned long long top = (unsigned long long)(i + 1) * (unsigned)n_units;
  if (top <= 0xffffffffull) {
    lo = unit * (int)((unsigned)i * (unsigned)n_units / (unsigned)parts);
    hi = unit * (int)((unsigned)top / (unsigned)parts);
  } else {
    lo = unit * (int)((unsigned long long)i * (unsigned)n_units / (unsigned)parts);
    hi = unit * (int)(top / (unsigned)parts);
  }
}

}  // namespace clusterfuse
