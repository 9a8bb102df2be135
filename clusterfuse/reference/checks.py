"""Argument validation shared by the reference ops: every failure is a ``ValueError`` that
names the argument and says what was expected, so a wrong call never reaches the math
(or, on the GPU side, a kernel)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape_str(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(name: str, t: object, *, shape: Sequence[int | None] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor of ``shape`` (``None`` matches any size), one of
    ``dtypes`` and on ``device``; return it."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
            raise ValueError(f"{name}: expected shape {_shape_str(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    return t


def check_positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def check_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Check ``low <= t < high`` elementwise (an index tensor)."""
    if t.numel() and (int(t.min()) < low or int(t.max()) >= high):
        raise ValueError(f"{name}: values must lie in [{low}, {high}), got min {int(t.min())} max {int(t.max())}")
