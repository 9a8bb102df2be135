"""Fused MoE block benchmark: clusterfuse vs PyTorch ops under a CUDA graph vs the memory floor.

    python -m bench.moe_block [--models deepseek-v2-lite] [--batches 1,4,16] [--clusters 1,2,4,8,16]
                              [--dtype bf16] [--out bench/results/moe_block_h100.json] [--quick]

For every model and batch, one run measures: the GEMV bandwidth (the floor's divisor), the torch
baseline (`TorchMoEBlock`: rms_norm + fp32 router + top-k + the chosen experts' weights gathered
per (sequence, slot) + batched GEMVs + shared MLP + residual, one CUDA graph), our kernel at every
cluster size (``clusterfuse@cN``) and the best one as the headline ``clusterfuse`` record. Both
compute ``x + MoE(x)`` in x's dtype on the same weights and inputs (checked against each other
before timing). The floor is the bytes actually read: the router, the shared experts and the
union of the experts the batch chose (`bench.floor.moe_block_bytes`), averaged over the rotated
weight sets; records carry ``experts_read`` (that union's size per set). Random router weights
spread the choices about uniformly, so batch 16 reads ~50 of the 64 experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench.baselines.torch_moe import TorchMoEBlock
from bench.common import (
    RecordWriter,
    block_bench_main,
    floor_us,
    record_headline,
    rotating_copies,
    time_cuda_graph,
)
from bench.floor import moe_block_bytes
from clusterfuse.models.presets import preset
from clusterfuse.ops.moe_block import CLUSTER_SIZES, MoeRouting, expert_union, moe_block

DEFAULT_MODELS = ("deepseek-v2-lite",)
DEFAULT_BATCHES = (1, 4, 16)
AGREEMENT_TOL = 2e-2  # ours against the torch baseline before timing (both bf16/fp16 pipelines)


def _ours(block: TorchMoEBlock, x: torch.Tensor, cluster: int, return_routing: bool = False):
    """Our op on the block's weights, computing the same ``x + MoE(x)``."""
    return moe_block(x, block.norm_weight, block.router, block.w_gate_up, block.w_down, block.config.rms_norm_eps,
                     MoeRouting.from_config(block.moe), shared_gate_up=block.shared_gate_up,
                     shared_down=block.shared_down, residual=x, cluster_size=cluster, return_routing=return_routing)


def _torch_fns(blocks: Sequence[TorchMoEBlock], x: torch.Tensor) -> list:
    return [lambda b=b: b(x) for b in blocks]


def _ours_fns(blocks: Sequence[TorchMoEBlock], x: torch.Tensor, cluster: int) -> list:
    return [lambda b=b: _ours(b, x, cluster) for b in blocks]


def _experts_read(block: TorchMoEBlock, x: torch.Tensor) -> int:
    """How many routed experts a launch on ``x`` reads: the union of the batch's choices."""
    normed = F.rms_norm(x, (x.shape[-1],), block.norm_weight, block.config.rms_norm_eps)
    return len(expert_union(block.route(normed)[1]))


def _check_agreement(block: TorchMoEBlock, x: torch.Tensor, cluster: int) -> None:
    """Ours and the baseline compute the same thing: the block's contribution (residual removed) of
    every sequence both route to the same experts (the two norms round differently, so a near tie
    may go the other way)."""
    out, ours_ids, _ = _ours(block, x, cluster, return_routing=True)
    normed = F.rms_norm(x, (x.shape[-1],), block.norm_weight, block.config.rms_norm_eps)
    theirs_ids = block.route(normed)[1]
    same = (ours_ids.long().sort(dim=-1).values == theirs_ids.sort(dim=-1).values).all(dim=-1)
    ours, theirs = (out.float() - x.float())[same], (block(x).float() - x.float())[same]
    err = ((ours - theirs).norm() / theirs.norm()).item() if same.any() else 0.0
    if not err < AGREEMENT_TOL:
        raise RuntimeError(f"moe_block: ours and the torch baseline differ (relative error {err:.3e}) at "
                           f"batch {x.shape[0]}, cluster {cluster}: not timing a wrong kernel")


def _bench_model(name: str, batches: Sequence[int], clusters: Sequence[int], dtype: torch.dtype, bw: float,
                 writer: RecordWriter, tk: dict[str, int]) -> list[dict]:
    dev = torch.device("cuda")
    cfg = preset(name)
    if cfg.moe is None:
        raise ValueError(f"--models: {name} has no mixture of experts")
    elem = torch.finfo(dtype).bits // 8
    seeds = iter(range(10**6))
    # Sets enough that batch 1's reads (the fewest) rotate past L2.
    blocks = rotating_copies(lambda: TorchMoEBlock(cfg, dtype=dtype, device=dev, seed=next(seeds)),
                             bytes_per_set=moe_block_bytes(cfg, 1, cfg.moe.num_experts_per_tok, elem).total)
    summary = []
    for batch in batches:
        x = torch.randn(batch, cfg.hidden_size, device=dev, generator=torch.Generator(dev).manual_seed(batch)).to(dtype)
        experts_read = [_experts_read(b, x) for b in blocks]
        nbytes = [moe_block_bytes(cfg, batch, n, elem).total for n in experts_read]
        floor = floor_us(sum(nbytes) // len(nbytes), bw)
        common = dict(model=name, batch=batch, floor_us=floor, experts_read=experts_read)

        t_torch = time_cuda_graph(_torch_fns(blocks, x), **tk)
        writer.append(variant="torch_cuda_graph", timing=t_torch, **common)

        sweep: dict[int, float] = {}
        for c in clusters:
            try:
                _check_agreement(blocks[0], x, c)
                t = time_cuda_graph(_ours_fns(blocks, x, c), **tk)
            except ValueError as err:  # e.g. no cluster of 16 can be resident
                print(f"{name} b={batch} c={c}: skipped ({err})")
                continue
            sweep[c] = t.median_us
            writer.append(variant="clusterfuse", cluster_size=c, timing=t, **common)
        if not sweep:
            continue
        best_c, t_best = record_headline(writer, sweep, lambda c, x=x: time_cuda_graph(_ours_fns(blocks, x, c), **tk),
                                         **common)
        summary.append(dict(model=name, batch=batch, c=best_c, ours=t_best.median_us, torch=t_torch.median_us,
                            floor=floor, glob=float("nan"), sweep=sweep))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    block_bench_main(argv, __doc__, "moe_block", DEFAULT_MODELS, DEFAULT_BATCHES, CLUSTER_SIZES, _bench_model)


if __name__ == "__main__":
    main()
