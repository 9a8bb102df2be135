"""Helpers every ops module uses to call a kernel library's C entry points.

Contract of an entry point (see ``clusterfuse/launch.cuh``): it takes raw device pointers,
sizes and a ``cudaStream_t``, launches, and returns an int ``cudaError_t`` (0 = launched).

    require_cuda_tensor("x", x, dtype=(torch.float32, torch.bfloat16), shape=(None, 4, None))
    check(lib.cf_my_op(ptr(x), ptr(out), n, stream_handle()), "my_op", lib)
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence

import torch

DTypes = torch.dtype | Sequence[torch.dtype] | None

def require_cuda_tensor(name: str, t: object, *, dtype: DTypes = None, shape: Sequence[int | None] | None = None,
                        contiguous: bool = True, align: int = 16) -> torch.Tensor:
    """Check that argument ``name`` is a CUDA tensor of the given dtype(s) and shape.

    ``shape`` entries of None match any size. Raises ValueError naming the argument, so a
    bad call fails in Python with a clear message instead of faulting inside a kernel."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (expected {' or '.join(map(str, allowed))})")
    if shape is not None:
        mismatch = t.dim() != len(shape) or any(
            want is not None and got != want for got, want in zip(t.shape, shape, strict=True))
        if mismatch:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: shape {list(t.shape)} does not match {want}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    # Under torch.compile tracing tensors are fake and have no address; the op's eager
    # implementation checks again with the real tensor before launching.
    if align and not torch.compiler.is_compiling() and t.data_ptr() % align:
        raise ValueError(f"{name}: data pointer must be {align}-byte aligned")
    return t



def require_same_device(device: torch.device, tensors: Mapping[str, torch.Tensor | None]) -> None:
    """ValueError naming the first of ``tensors`` (None: not given) that is not on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_eps(eps: object) -> None:
    """ValueError unless ``eps`` (a norm's epsilon) is a positive number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """ValueError naming ``name`` unless ``value`` is None (the tuner's choice) or one of ``choices``."""
    if value is not None and value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)} or None, got {value!r}")

def address(t: torch.Tensor | None) -> int | None:
    """The tensor's device address for a ``void*`` field of an argument struct (None → NULL)."""
    return None if t is None else t.data_ptr()


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The tensor's device address for a ``void*`` parameter (None → NULL)."""
    return ctypes.c_void_p(address(t))


def stream_handle(device: torch.device | None = None) -> ctypes.c_void_p:
    """The current CUDA stream as a ``cudaStream_t`` (what CUDA-graph capture records)."""
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def error_text(rc: int, lib: ctypes.CDLL | None = None) -> str:
    """cudaGetErrorString for ``rc``, asked of a clusterfuse library (each has its own cudart)."""
    if lib is None:
        from clusterfuse.ops.build import any_loaded_library

        lib = any_loaded_library()
    if lib is None:
        return "unknown CUDA error"
    text = lib.cf_error_string(int(rc))
    return text.decode() if text else "unknown CUDA error"


def check(rc: int, what: str, lib: ctypes.CDLL | None = None) -> None:
    """Raise RuntimeError if a C entry point returned a nonzero ``cudaError_t``."""
    if rc:
        raise RuntimeError(f"{what}: CUDA error {rc}: {error_text(rc, lib)}")


def raise_on_code(rc: int, what: str, lib: ctypes.CDLL, describe: Callable[[int], bytes]) -> None:
    """A fused op's return code: ours (negative: shape and capacity limits, told by the library's
    ``describe``) → ValueError; a ``cudaError_t`` (positive) → RuntimeError; 0 → nothing."""
    if rc < 0:
        raise ValueError(f"{what}: {describe(rc).decode()} (code {rc})")
    check(rc, what, lib)


def require_hopper(name: str, device: torch.device, kernel: str) -> None:
    """The fused kernels use thread-block clusters and sm_90a instructions: Hopper only."""
    if torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError(f"{name}: the fused {kernel} kernel needs a Hopper GPU (sm_90), got "
                         f"{torch.cuda.get_device_name(device)}")


class DeviceCounters:
    """One op's zero-initialised int32 counters (``count`` per device), allocated on a device's first
    use, which must not happen while a CUDA graph is captured (call the op once first). Kernels
    leave them as they found them (the self-resetting grid barrier of grid_sync.cuh), so launches
    and graph replays need no reset; one launch of the op per device at a time."""

    def __init__(self, op: str, count: int = 1) -> None:
        self.op, self.count = op, count
        self._lock = threading.Lock()
        self._by_device: dict[int, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        with self._lock:
            if device.index not in self._by_device:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(f"{self.op}: call it once on this device before capturing a CUDA graph "
                                       "(its barrier counter is allocated on first use)")
                self._by_device[device.index] = torch.zeros(self.count, dtype=torch.int32, device=device)
            return self._by_device[device.index]
