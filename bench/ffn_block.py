"""Fused FFN block benchmark: clusterfuse vs PyTorch ops under a CUDA graph vs the memory floor.

    python -m bench.ffn_block [--models llama-2-7b,llama-3-8b,smollm2-135m] [--batches 1,4,16]
                              [--clusters 1,2,4,8,16] [--dtype bf16] [--out bench/results/ffn_block_h100.json]

For every model and batch, one run measures: the GEMV bandwidth (the floor's divisor), the
torch baseline (`TorchFFNBlock`: rms_norm + gate/up GEMM + silu·up + down GEMM + residual, one
CUDA graph), our kernel at every cluster size with DSM exchange (``clusterfuse@cN``) and with
global-memory exchange (``clusterfuse_global_memory@cN``, the ablation), and the best DSM
cluster size as the headline ``clusterfuse`` record. All variants compute ``x + FFN(x)`` in
x's dtype. Weight sets are rotated so that small models (SmolLM2: 5 MB) are timed from HBM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench.baselines.torch_blocks import TorchFFNBlock
from bench.common import (
    RecordWriter,
    block_bench_main,
    ffn_block_bytes,
    floor_us,
    record_headline,
    rotating_copies,
    time_cuda_graph,
)
from clusterfuse.models.presets import preset
from clusterfuse.ops.ffn_block import CLUSTER_SIZES, ffn_block

DEFAULT_MODELS = ("llama-2-7b", "llama-3-8b", "smollm2-135m")
DEFAULT_BATCHES = (1, 4, 16)



def _torch_fns(blocks: Sequence[TorchFFNBlock], x: torch.Tensor) -> list:
    return [lambda b=b: b(x) for b in blocks]


def _ours_fns(blocks: Sequence[TorchFFNBlock], x: torch.Tensor, eps: float, cluster: int, exchange: str) -> list:
    """Our op on the same weights, computing the same ``x + FFN(x)`` as the torch block."""
    return [lambda b=b: ffn_block(x, b.norm_weight, b.w_gate_up, b.w_down, eps, residual=x, cluster_size=cluster,
                                  exchange=exchange) for b in blocks]


def _bench_model(name: str, batches: Sequence[int], clusters: Sequence[int], dtype: torch.dtype, bw: float,
                 writer: RecordWriter, tk: dict[str, int]) -> list[dict]:
    dev = torch.device("cuda")
    cfg = preset(name)
    seeds = iter(range(10**6))
    blocks = rotating_copies(lambda: TorchFFNBlock(cfg, dtype=dtype, device=dev, seed=next(seeds)))
    eps, summary = cfg.rms_norm_eps, []
    for batch in batches:
        x = torch.randn(batch, cfg.hidden_size, device=dev).to(dtype)
        floor = floor_us(ffn_block_bytes(cfg, batch, torch.finfo(dtype).bits // 8), bw)
        common = dict(model=name, batch=batch, floor_us=floor)

        t_torch = time_cuda_graph(_torch_fns(blocks, x), **tk)
        writer.append(variant="torch_cuda_graph", timing=t_torch, **common)

        sweep: dict[str, dict[int, float]] = {"dsm": {}, "global": {}}
        for exchange, variant in (("dsm", "clusterfuse"), ("global", "clusterfuse_global_memory")):
            for c in clusters:
                try:
                    t = time_cuda_graph(_ours_fns(blocks, x, eps, c, exchange), **tk)
                except (ValueError, RuntimeError) as err:  # e.g. no cluster of 16 can be resident
                    print(f"{name} b={batch} c={c} {exchange}: skipped ({err})")
                    continue
                sweep[exchange][c] = t.median_us
                writer.append(variant=variant, cluster_size=c, timing=t, **common)
        if not sweep["dsm"]:
            continue
        best_c, t_best = record_headline(
            writer, sweep["dsm"], lambda c, x=x: time_cuda_graph(_ours_fns(blocks, x, eps, c, "dsm"), **tk), **common)
        summary.append(dict(model=name, batch=batch, c=best_c, ours=t_best.median_us, torch=t_torch.median_us,
                            floor=floor, glob=min(sweep["global"].values(), default=float("nan")),
                            sweep=sweep["dsm"]))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    block_bench_main(argv, __doc__, "ffn_block", DEFAULT_MODELS, DEFAULT_BATCHES, CLUSTER_SIZES, _bench_model)


if __name__ == "__main__":
    main()
