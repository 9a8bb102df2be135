"""Fused FFN block (RMSNorm → gate/up → SiLU·up → down [+ residual]) as one Hopper kernel.

``ffn_block(x, norm_weight, w_gate_up, w_down, eps, *, residual=None, cluster_size=None,
exchange=None, options=DEFAULT_KERNEL_OPTIONS)`` matches `clusterfuse.reference.ops.ffn_block`:

* ``x [B, H]`` (bf16 or fp16, B ≤ 16), ``norm_weight [H]``, ``w_gate_up [2I, H]`` (gate rows then
  up rows: Hugging Face ``gate_proj`` and ``up_proj`` concatenated), ``w_down [H, I]``;
* returns fp32 ``[B, H]`` = down(silu(gate(n)) · up(n)), n = RMSNorm(x) · norm_weight, or, when
  ``residual [B, H]`` is given, ``residual + that`` in x's dtype;
* ``cluster_size`` ∈ {1, 2, 4, 8, 16}; ``exchange="dsm"`` passes the activation slice between
  the cluster's blocks through distributed shared memory, ``"global"`` through global memory (same
  dataflow). None (the default of both) lets the tuner time the choices once per shape and GPU and
  keep the fastest pair: on an H200 the global path was ~1% faster at batch 1
  (bench/results/exchange_tuning_h200.md).
* ``options`` (`clusterfuse.ops.options.KernelOptions`): the programmatic launch mode; results are
  bit-identical under every value.

The kernel is deterministic (fp32 partials summed in a fixed order) and reads each weight byte
from HBM once; see ``clusterfuse/kernels/ffn/ffn_block.cu``. It is registered as the custom op
``torch.ops.clusterfuse.ffn_block`` (capturable in CUDA graphs; tune before capturing).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from clusterfuse.ops.kernel_abi import FfnBlockArgs, FfnBlockPlan, FfnBlockShape, bind_ffn_block
from clusterfuse.ops.launch import (
    DeviceCounters,
    address,
    check_choice,
    check_eps,
    raise_on_code,
    require_cuda_tensor,
    require_hopper,
    require_same_device,
    stream_handle,
)
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.ops.tuner import TUNER

CLUSTER_SIZES = (1, 2, 4, 8, 16)
EXCHANGES = ("dsm", "global")
MAX_BATCH = 16
DEFAULT_CLUSTER_SIZE = 8  # used only while capturing a graph with no tuned choice
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
_ERR_SMEM = -2  # cf_ffn_block_error: batch × hidden does not fit in shared memory


LIB_NAME, LIB_SOURCES = "ffn_block", ("ffn/ffn_block.cu",)


def build_spec() -> tuple[str, tuple[str, ...], dict]:
    """``(name, sources, defines)`` of the library (one for every shape: sizes are run-time
    arguments), for `clusterfuse.ops.build.prebuild`."""
    return LIB_NAME, LIB_SOURCES, {}


@functools.cache
def _lib() -> ctypes.CDLL:
    from clusterfuse.ops.build import load_library

    return bind_ffn_block(load_library(*build_spec()))


# ------------------------------------------------------------------------------- validation
def check_model_shape(hidden_size: int, intermediate_size: int) -> None:
    """The kernel's rules on a model's dimensions (no tensors, no GPU): ValueError naming the first one it
    does not take."""
    _check_hidden(hidden_size)
    _check_gate_up_rows(2 * intermediate_size)


def _check_hidden(h: int) -> None:
    if h < 8 or h % 8:
        raise ValueError(f"x: hidden size must be a positive multiple of 8, got {h}")


def _check_gate_up_rows(two_i: int) -> int:
    """The intermediate size of a gate/up weight of ``two_i`` rows."""
    inter = two_i // 2
    if two_i % 2 or inter < 8 or inter % 8:
        raise ValueError(f"w_gate_up: expected 2 * intermediate rows with intermediate a positive multiple of 8, "
                         f"got {two_i} rows")
    return inter


def _validate(x, norm_weight, w_gate_up, w_down, eps, residual, cluster_size, exchange) -> tuple[int, int, int]:
    dtypes = tuple(_DTYPE_CODES)
    b, h = require_cuda_tensor("x", x, dtype=dtypes, shape=(None, None)).shape
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"x: batch must be in [1, {MAX_BATCH}], got {b}")
    _check_hidden(h)
    require_hopper("x", x.device, "FFN")
    two_i = require_cuda_tensor("w_gate_up", w_gate_up, dtype=x.dtype, shape=(None, h)).shape[0]
    inter = _check_gate_up_rows(two_i)
    named = {"norm_weight": (norm_weight, (h,)), "w_down": (w_down, (h, inter)), "residual": (residual, (b, h))}
    for name, (t, shape) in named.items():
        if t is not None or name != "residual":
            require_cuda_tensor(name, t, dtype=x.dtype, shape=shape)
    require_same_device(x.device, {"norm_weight": norm_weight, "w_gate_up": w_gate_up, "w_down": w_down,
                                   "residual": residual})
    check_eps(eps)
    check_choice("cluster_size", cluster_size, CLUSTER_SIZES)
    check_choice("exchange", exchange, EXCHANGES)
    return b, h, inter


# ------------------------------------------------------------------------------- launching
#: The grid-barrier counter of each device (grid_sync.cuh).
_BARRIER_COUNTERS = DeviceCounters("ffn_block")


@functools.cache
def _plan(device_index: int, dtype_code: int, b: int, h: int, inter: int, cluster: int, dsm: int) -> FfnBlockPlan:
    """The kernel's plan (grid, shared memory, slice length, k splits) on this device, or raises."""
    plan = FfnBlockPlan()
    shape = FfnBlockShape(dtype_code, b, h, inter, cluster, dsm)
    with torch.cuda.device(device_index):
        raise_on_code(_lib().cf_ffn_block_plan(ctypes.byref(shape), ctypes.byref(plan)),
                      f"ffn_block(batch={b}, hidden={h}, intermediate={inter}, cluster_size={cluster})", _lib(),
                      _lib().cf_ffn_block_error)
    return plan


def _batch_fits(device_index: int, dtype_code: int, b: int, h: int, inter: int, cluster: int, dsm: int) -> bool:
    try:
        _plan(device_index, dtype_code, b, h, inter, cluster, dsm)
        return True
    except ValueError as err:
        if f"code {_ERR_SMEM}" in str(err):
            return False
        raise


def _launch(x, norm_weight, w_gate_up, w_down, eps, residual, out, cluster, exchange, launch_mode) -> None:
    b, h = x.shape
    inter = w_down.shape[1]
    dev, code, dsm = x.device.index, _DTYPE_CODES[x.dtype], int(exchange == "dsm")
    if not _batch_fits(dev, code, b, h, inter, cluster, dsm):
        # The normed batch must fit in shared memory (hidden 8192 × batch > 12): run halves.
        # Correct, but each half re-reads the weights.
        half = b // 2
        for lo, hi in ((0, half), (half, b)):
            _launch(x[lo:hi], norm_weight, w_gate_up, w_down, eps,
                    None if residual is None else residual[lo:hi], out[lo:hi], cluster, exchange, launch_mode)
        return
    plan = _plan(dev, code, b, h, inter, cluster, dsm)
    num_clusters, lmax = plan.num_clusters, plan.lmax
    partials = torch.empty(num_clusters * b * h, dtype=torch.float32, device=x.device)
    act_ws = None if dsm else torch.empty(num_clusters * b * lmax, dtype=x.dtype, device=x.device)
    counter = _BARRIER_COUNTERS.get(x.device)
    p = address
    args = FfnBlockArgs(shape=FfnBlockShape(code, b, h, inter, cluster, dsm), x=p(x), norm_w=p(norm_weight),
                        w_gate_up=p(w_gate_up), w_down=p(w_down), residual=p(residual), out=p(out),
                        partials=p(partials), act_ws=p(act_ws), counter=p(counter), launch_mode=launch_mode,
                        eps=float(eps))
    rc = _lib().cf_ffn_block_launch(ctypes.byref(args), ctypes.byref(plan), stream_handle(x.device))
    raise_on_code(rc, "ffn_block launch", _lib(), _lib().cf_ffn_block_error)


@torch.library.custom_op("clusterfuse::ffn_block", mutates_args=())
def _ffn_block_op(x: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  eps: float, residual: torch.Tensor | None, cluster_size: int, exchange: str,
                  launch_mode: int) -> torch.Tensor:
    # Slices of a batch split (see _launch) must stay 16-byte aligned: hidden is a multiple of 8.
    out = torch.empty(x.shape, dtype=x.dtype if residual is not None else torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _launch(x, norm_weight, w_gate_up, w_down, eps, residual, out, cluster_size, exchange, launch_mode)
    return out


@_ffn_block_op.register_fake
def _(x, norm_weight, w_gate_up, w_down, eps, residual, cluster_size, exchange, launch_mode):
    return x.new_empty(x.shape, dtype=x.dtype if residual is not None else torch.float32)


def choose_launch(x: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  eps: float, residual: torch.Tensor | None = None, cluster_size: int | None = None,
                  exchange: str | None = None, options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> tuple[int, str]:
    """The tuned (cluster size, exchange) for these shapes on this GPU, over the axes left None
    (timed once, then cached)."""
    b, h = x.shape
    inter = w_down.shape[1]
    key = TUNER.make_key("ffn_block", x.device, {"dtype": str(x.dtype).removeprefix("torch."), "hidden": h,
                                                 "intermediate": inter, "batch": b, "cluster": cluster_size,
                                                 "exchange": exchange})
    return TUNER.choose_launch(
        "ffn_block", key, cluster_size, exchange, CLUSTER_SIZES, EXCHANGES,
        lambda c, xc: _ffn_block_op(x, norm_weight, w_gate_up, w_down, float(eps), residual, c, xc,
                                    options.launch_mode("ffn")),
        default_cluster=DEFAULT_CLUSTER_SIZE)


def ffn_block(x: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              eps: float, *, residual: torch.Tensor | None = None, cluster_size: int | None = None,
              exchange: str | None = None, options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> torch.Tensor:
    """Fused SwiGLU FFN block; see the module docstring. Raises ValueError naming the bad argument."""
    _validate(x, norm_weight, w_gate_up, w_down, eps, residual, cluster_size, exchange)
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options: expected a KernelOptions, got {type(options).__name__}")
    if cluster_size is None or exchange is None:
        cluster_size, exchange = choose_launch(x, norm_weight, w_gate_up, w_down, eps, residual, cluster_size,
                                               exchange, options)
    return _ffn_block_op(x, norm_weight, w_gate_up, w_down, float(eps), residual, cluster_size, exchange,
                         options.launch_mode("ffn"))


def launch_plan(dtype: torch.dtype, batch: int, hidden: int, intermediate: int, cluster_size: int, exchange: str, *,
                device: torch.device) -> FfnBlockPlan:
    """The kernel's plan for these launch choices on ``device`` (cached; slices, shared memory, k
    splits): what the persistent decode step (`clusterfuse.ops.decode_step`) takes over, so that it
    partitions its FFN phases as this kernel does. ValueError where the kernel refuses them (a
    batch whose normed rows do not fit in shared memory, which this op itself runs in halves)."""
    return _plan(device.index, _DTYPE_CODES[dtype], batch, hidden, intermediate, cluster_size, int(exchange == "dsm"))
