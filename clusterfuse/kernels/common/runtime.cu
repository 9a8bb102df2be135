// Compiled into every clusterfuse kernel library (clusterfuse/ops/build.py adds it).
//
// Why: each library links cudart statically, so Python has no other cudart to ask what an
// error code means; these entry points answer from the library's own copy.
#include <cuda_runtime.h>

extern "C" {

// cudaGetErrorString for a cudaError_t returned by any entry point of this library.
const char* cf_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// cudaGetErrorName, e.g. "cudaErrorInvalidValue".
const char* cf_error_name(int code) { return cudaGetErrorName(static_cast<cudaError_t>(code)); }

// The CUDA runtime version this library was linked with (e.g. 13000), for `clusterfuse info`.
int cf_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // extern "C"
