"""Choosing where and how a model runs: device, dtype and backend (fused kernels or reference).

The fused backend needs a Hopper GPU (compute capability 9.0) and nvcc to build its
kernels; everywhere else the PyTorch reference backend runs, and we say so once.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

import torch

log = logging.getLogger("clusterfuse")

BACKENDS = ("auto", "fused", "reference")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Platform:
    """What this machine offers, as `clusterfuse info` reports it."""

    device: torch.device
    device_name: str
    compute_capability: tuple[int, int] | None
    nvcc: str | None

    @property
    def is_hopper(self) -> bool:
        return self.compute_capability == (9, 0)

    @property
    def fused_possible(self) -> bool:
        return self.is_hopper and self.nvcc is not None

    def fused_unavailable_reason(self) -> str | None:
        if self.device.type != "cuda":
            return "no CUDA GPU"
        if not self.is_hopper:
            cc = self.compute_capability
            return f"{self.device_name} has compute capability {cc[0]}.{cc[1]}, the fused kernels need 9.0 (Hopper)"
        if self.nvcc is None:
            return "nvcc was not found on PATH (needed to build the fused kernels)"
        return None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the current CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: expected one of auto, {', '.join(DTYPES)}; got {name!r}") from None


def detect_platform(device: torch.device) -> Platform:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return Platform(device, props.name, (props.major, props.minor), shutil.which("nvcc"))
    return Platform(device, "cpu", None, shutil.which("nvcc"))


#: Model families the fused decode engine runs.
FUSED_FAMILIES = ("llama",)


def resolve_backend(requested: str, platform: Platform, family: str = "llama") -> str:
    """The backend that will run: ``fused`` on Hopper for the Llama family, ``reference`` elsewhere
    (logged once)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}; got {requested!r}")
    reason = platform.fused_unavailable_reason()
    if reason is None and family not in FUSED_FAMILIES:
        reason = f"the fused decode engine runs the {', '.join(FUSED_FAMILIES)} family, not {family}"
    if requested == "fused":
        if reason:
            raise ValueError(f"backend: 'fused' requested but {reason}")
        return "fused"
    if requested == "auto":
        if reason is None:
            return "fused"
        log.info("using the reference backend: %s", reason)
    return "reference"

