"""Python entry points to the cluster primitives' test kernels (``kernels/primitives/``).

These exist to test and benchmark ``ClusterReduce`` / ``ClusterGather`` from PyTorch; fused
kernels use the CUDA headers directly. Each op takes ``x: [clusters, N, elems]`` (one tile per
block, N = cluster size in {1, 2, 4, 8, 16}) and launches ``clusters`` clusters of N blocks.

* `cluster_reduce(x, op, algo, exchange, root, repeats)`: every block's tile (or only the
  root's) becomes op over its cluster; ``repeats`` back-to-back calls in one kernel.
* `cluster_gather(x, exchange, repeats)`: ``[clusters, N, N, elems]``, every block's copy of all
  N tiles (rotated by ``repeats - 1``, see ``cluster_gather.cu``).
* `softmax_merge(m, l, o, ...)`: merge split-KV online-softmax partials across the cluster.
* `*_timed` variants also return the in-kernel time of the repeat loop (ns, per cluster).

All are ``torch.library.custom_op`` s (``clusterfuse::...``), usable in CUDA graphs and under
torch.compile; bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from clusterfuse.ops.launch import check, ptr, require_cuda_tensor, stream_handle

CLUSTER_SIZES = (1, 2, 4, 8, 16)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
OP_CODES = {"sum": 0, "max": 1, "softmax": 2}
ALGOS = {"tree": 0, "ring": 1}
EXCHANGES = {"dsm": 0, "global": 1}
MAX_SMEM_BYTES = 227 * 1024
DEFAULT_THREADS = 256


# ------------------------------------------------------------------------------- libraries
@functools.cache
def _reduce_lib(n: int, dtype_code: int, op_code: int, softmax_dim: int) -> ctypes.CDLL:
    from clusterfuse.ops.build import load_library

    defines = {"CF_CLUSTER": n, "CF_DTYPE": dtype_code, "CF_OP": op_code}
    if op_code == OP_CODES["softmax"]:
        defines["CF_SOFTMAX_DIM"] = softmax_dim
    lib = load_library("cluster_reduce", ["primitives/cluster_reduce.cu"], defines)
    i, p, sz = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    lib.cf_cluster_reduce.argtypes = [p, p, i, i, i, i, i, i, p, p, i, p]
    lib.cf_cluster_reduce.restype = i
    lib.cf_cluster_reduce_workspace_bytes.argtypes = [i, i, i, i]
    lib.cf_cluster_reduce_workspace_bytes.restype = sz
    lib.cf_cluster_reduce_smem_bytes.argtypes = [i, i]
    lib.cf_cluster_reduce_smem_bytes.restype = sz
    return lib


@functools.cache
def _gather_lib(n: int, dtype_code: int, stages: int) -> ctypes.CDLL:
    from clusterfuse.ops.build import load_library

    defines = {"CF_CLUSTER": n, "CF_DTYPE": dtype_code, "CF_GATHER_STAGES": stages}
    lib = load_library("cluster_gather", ["primitives/cluster_gather.cu"], defines)
    i, p, sz = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    lib.cf_cluster_gather.argtypes = [p, p, i, i, i, i, p, p, i, p]
    lib.cf_cluster_gather.restype = i
    lib.cf_cluster_gather_workspace_bytes.argtypes = [i, i, i]
    lib.cf_cluster_gather_workspace_bytes.restype = sz
    lib.cf_cluster_gather_smem_bytes.argtypes = [i]
    lib.cf_cluster_gather_smem_bytes.restype = sz
    return lib


def reduce_library_spec(n: int, dtype: torch.dtype, op: str, softmax_dim: int = 64) -> tuple:
    """``(name, sources, defines)`` of a reduce library, for `clusterfuse.ops.build.prebuild`."""
    defines = {"CF_CLUSTER": n, "CF_DTYPE": DTYPE_CODES[dtype], "CF_OP": OP_CODES[op]}
    if op == "softmax":
        defines["CF_SOFTMAX_DIM"] = softmax_dim
    return ("cluster_reduce", ["primitives/cluster_reduce.cu"], defines)


def gather_library_spec(n: int, dtype: torch.dtype, stages: int = 2) -> tuple:
    defines = {"CF_CLUSTER": n, "CF_DTYPE": DTYPE_CODES[dtype], "CF_GATHER_STAGES": stages}
    return ("cluster_gather", ["primitives/cluster_gather.cu"], defines)


# ------------------------------------------------------------------------------- validation
def _choice(name: str, value: str, choices: dict) -> int:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} not one of {', '.join(map(repr, choices))}")
    return choices[value]


def _check_tiles(x: object, dtypes=tuple(DTYPE_CODES)) -> tuple[int, int, int]:
    """x must be a CUDA tensor [clusters, N, elems] with N a supported cluster size."""
    require_cuda_tensor("x", x, dtype=dtypes)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [clusters, cluster_size, elems], got {list(x.shape)}")
    clusters, n, elems = x.shape
    if n not in CLUSTER_SIZES:
        raise ValueError(f"x: cluster size (dim 1) must be one of {CLUSTER_SIZES}, got {n}")
    if clusters < 1 or elems < 1:
        raise ValueError(f"x: needs at least one cluster and one element, got {list(x.shape)}")
    return clusters, n, elems


def _check_threads(threads: int) -> None:
    if not (32 <= threads <= 1024 and threads % 32 == 0):
        raise ValueError(f"threads: must be a multiple of 32 in [32, 1024], got {threads}")


def _fits_smem(name: str, smem: int) -> None:
    if smem > MAX_SMEM_BYTES:
        raise ValueError(f"{name}: needs {smem} bytes of shared memory per block (limit {MAX_SMEM_BYTES})")


# ------------------------------------------------------------------------------- reduce
def _launch_reduce(x: torch.Tensor, op: str, algo: str, exchange: str, root: int, repeats: int, threads: int,
                   softmax_dim: int, timing: torch.Tensor | None) -> torch.Tensor:
    require_cuda_tensor("x", x)  # again, eagerly: under torch.compile the wrapper saw a fake tensor
    clusters, n, elems = x.shape
    lib = _reduce_lib(n, DTYPE_CODES[x.dtype], OP_CODES[op], softmax_dim)
    a, e = ALGOS[algo], EXCHANGES[exchange]
    _fits_smem("x", lib.cf_cluster_reduce_smem_bytes(elems, a))
    out = torch.full_like(x, float("nan"))  # poisoned: an element the kernel skips shows up
    ws_bytes = lib.cf_cluster_reduce_workspace_bytes(clusters, elems, a, e)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device) if ws_bytes else None
    rc = lib.cf_cluster_reduce(ptr(x), ptr(out), clusters, elems, a, e, root, repeats, ptr(ws), ptr(timing),
                               threads, stream_handle(x.device))
    check(rc, f"cluster_reduce(N={n}, {x.dtype}, {op}, {algo}, {exchange})", lib)
    return out


def _validate_reduce(x, op, algo, exchange, root, repeats, threads, softmax_dim=64) -> None:
    """Checks that need no library (traceable by torch.compile); the launch checks shared memory."""
    _, n, elems = _check_tiles(x)
    _choice("op", op, OP_CODES)
    _choice("algo", algo, ALGOS)
    _choice("exchange", exchange, EXCHANGES)
    if root is not None and not (isinstance(root, int) and 0 <= root < n):
        raise ValueError(f"root: must be None (all-reduce) or a block rank in [0, {n}), got {root!r}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats: must be a positive int, got {repeats!r}")
    _check_threads(threads)
    if op == "softmax" and elems % (softmax_dim + 2):
        raise ValueError(f"x: softmax records are {softmax_dim + 2} values; {elems} elements is not a whole number")


@torch.library.custom_op("clusterfuse::cluster_reduce", mutates_args=())
def _cluster_reduce_op(x: torch.Tensor, op: str, algo: str, exchange: str, root: int, repeats: int, threads: int,
                       softmax_dim: int) -> torch.Tensor:
    return _launch_reduce(x, op, algo, exchange, root, repeats, threads, softmax_dim, None)


@_cluster_reduce_op.register_fake
def _(x, op, algo, exchange, root, repeats, threads, softmax_dim):
    return torch.empty_like(x)


def cluster_reduce(x: torch.Tensor, op: str = "sum", algo: str = "tree", exchange: str = "dsm",
                   root: int | None = None, repeats: int = 1, threads: int = DEFAULT_THREADS) -> torch.Tensor:
    """Reduce ``x: [clusters, N, elems]`` over dim 1 inside each cluster (fp32 accumulation).

    Returns a tensor like x: every block's tile holds the result (``root=None``) or only block
    ``root``'s does (other tiles are returned unchanged). ``repeats`` > 1 reduces in place that
    many times back to back (sum then scales by N per extra call; max is idempotent)."""
    _choice("op", op, {k: v for k, v in OP_CODES.items() if k != "softmax"})  # softmax: use softmax_merge()
    _validate_reduce(x, op, algo, exchange, root, repeats, threads)
    return _cluster_reduce_op(x, op, algo, exchange, -1 if root is None else root, repeats, threads, 64)


def cluster_reduce_timed(x: torch.Tensor, op: str = "sum", algo: str = "tree", exchange: str = "dsm",
                         root: int | None = None, repeats: int = 1, threads: int = DEFAULT_THREADS,
                         softmax_dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_reduce` plus the in-kernel time of the repeat loop, ns per cluster (int64)."""
    _validate_reduce(x, op, algo, exchange, root, repeats, threads, softmax_dim)
    timing = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    out = _launch_reduce(x, op, algo, exchange, -1 if root is None else root, repeats, threads, softmax_dim, timing)
    return out, timing


# ------------------------------------------------------------------------------- softmax merge
def softmax_merge(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor, algo: str = "tree", exchange: str = "dsm",
                  root: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge online-softmax partials of the N blocks of each cluster (split-KV attention).

    ``m, l: [clusters, N, rows]`` (max score, sum of exp(s - m)), ``o: [clusters, N, rows, D]``
    (unnormalised sum of exp(s - m) v), all fp32. Returns merged ``(m, l, o)`` of shapes
    ``[clusters, rows]`` and ``[clusters, rows, D]`` as block ``root`` (default 0) sees them;
    the attention output is ``o / l[..., None]``."""
    require_cuda_tensor("m", m, dtype=torch.float32)
    require_cuda_tensor("l", l, dtype=torch.float32, shape=tuple(m.shape))
    require_cuda_tensor("o", o, dtype=torch.float32)
    if m.dim() != 3:
        raise ValueError(f"m: expected shape [clusters, cluster_size, rows], got {list(m.shape)}")
    if o.dim() != 4 or tuple(o.shape[:3]) != tuple(m.shape):
        raise ValueError(f"o: expected shape {[*m.shape, 'D']}, got {list(o.shape)}")
    clusters, n, rows = m.shape
    d = o.shape[3]
    packed = torch.cat([m.unsqueeze(-1), l.unsqueeze(-1), o], dim=-1).reshape(clusters, n, rows * (d + 2))
    _validate_reduce(packed, "softmax", algo, exchange, root, 1, DEFAULT_THREADS, d)
    r = 0 if root is None else root
    out = _cluster_reduce_op(packed, "softmax", algo, exchange, -1 if root is None else root, 1, DEFAULT_THREADS, d)
    merged = out[:, r].reshape(clusters, rows, d + 2)
    return merged[..., 0].contiguous(), merged[..., 1].contiguous(), merged[..., 2:].contiguous()


# ------------------------------------------------------------------------------- gather
def _launch_gather(x: torch.Tensor, exchange: str, repeats: int, stages: int, threads: int,
                   timing: torch.Tensor | None) -> torch.Tensor:
    require_cuda_tensor("x", x)
    clusters, n, elems = x.shape
    lib = _gather_lib(n, DTYPE_CODES[x.dtype], stages)
    e = EXCHANGES[exchange]
    _fits_smem("x", lib.cf_cluster_gather_smem_bytes(elems))
    out = torch.full((clusters, n, n, elems), float("nan"), dtype=x.dtype, device=x.device)  # poisoned
    ws_bytes = lib.cf_cluster_gather_workspace_bytes(clusters, elems, e)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    rc = lib.cf_cluster_gather(ptr(x), ptr(out), clusters, elems, e, repeats, ptr(ws), ptr(timing), threads,
                               stream_handle(x.device))
    check(rc, f"cluster_gather(N={n}, {x.dtype}, {exchange})", lib)
    return out


def _validate_gather(x, exchange, repeats, stages, threads) -> None:
    _check_tiles(x)
    _choice("exchange", exchange, EXCHANGES)
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats: must be a positive int, got {repeats!r}")
    if stages not in (1, 2):
        raise ValueError(f"stages: must be 1 or 2, got {stages!r}")
    _check_threads(threads)


@torch.library.custom_op("clusterfuse::cluster_gather", mutates_args=())
def _cluster_gather_op(x: torch.Tensor, exchange: str, repeats: int, stages: int, threads: int) -> torch.Tensor:
    return _launch_gather(x, exchange, repeats, stages, threads, None)


@_cluster_gather_op.register_fake
def _(x, exchange, repeats, stages, threads):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[1], x.shape[2])


def cluster_gather(x: torch.Tensor, exchange: str = "dsm", repeats: int = 1, stages: int = 2,
                   threads: int = DEFAULT_THREADS) -> torch.Tensor:
    """All-gather ``x: [clusters, N, elems]`` → ``[clusters, N (block), N (source), elems]``.

    With ``repeats`` = R the kernel rotates tiles between calls, so the result is
    ``out[c, b, p] = x[c, (p + R - 1) % N]`` for every block b."""
    _validate_gather(x, exchange, repeats, stages, threads)
    return _cluster_gather_op(x, exchange, repeats, stages, threads)


def cluster_gather_timed(x: torch.Tensor, exchange: str = "dsm", repeats: int = 1, stages: int = 2,
                         threads: int = DEFAULT_THREADS) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_gather` plus the in-kernel time of the repeat loop, ns per cluster (int64)."""
    _validate_gather(x, exchange, repeats, stages, threads)
    timing = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return _launch_gather(x, exchange, repeats, stages, threads, timing), timing


def smem_fits_gather(n: int, dtype: torch.dtype, elems: int, stages: int = 2) -> bool:
    """Whether a gather of this shape fits in shared memory (no GPU needed; builds the library)."""
    return _gather_lib(n, DTYPE_CODES[dtype], stages).cf_cluster_gather_smem_bytes(elems) <= MAX_SMEM_BYTES


def all_library_specs() -> list[tuple]:
    """Every primitives library the GPU tests and the benchmark use, for `build.prebuild`."""
    specs = []
    for n in CLUSTER_SIZES:
        for dtype in DTYPE_CODES:
            specs += [reduce_library_spec(n, dtype, op) for op in ("sum", "max")]
            specs += [gather_library_spec(n, dtype, stages) for stages in (1, 2)]
        specs += [reduce_library_spec(n, torch.float32, "softmax", d) for d in (64, 128)]
    return specs
