"""One fused kernel launched a few times on a real model's shapes, for Nsight Compute to profile
(``ncu --launch-skip 3 --launch-count 1 python -m tools.ncu_targets ...``).

    python -m tools.ncu_targets attention --model llama-3-8b --cluster 16 [--batch 1] [--seq-len 1024]
    python -m tools.ncu_targets ffn --model llama-2-7b --cluster 8 [--batch 1] [--exchange tuned]

Random bf16 weights of the model's shapes; the attention block reads a contiguous cache holding
``seq-len`` keys per sequence and exchanges through DSM; the FFN block exchanges through DSM, the
global workspace, or what the tuner picks (``--exchange tuned``: its timing launches come first).
Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

LAUNCHES = 5  # ncu profiles one of them: --launch-skip 3 leaves the first launches to warm up


def run_attention(model: str, batch: int, seq_len: int, cluster: int) -> None:
    from bench.attention_block import _ours_fns
    from bench.baselines.torch_blocks import DecodePositions, TorchAttentionBlock
    from clusterfuse.models.presets import preset
    from clusterfuse.reference.rope import rope_cos_sin

    cfg, dev = preset(model), torch.device("cuda")
    capacity = seq_len + 16
    pos = DecodePositions(batch, capacity, dev)
    pos.set(seq_len)
    block = TorchAttentionBlock(cfg, batch, capacity, device=dev, positions=pos)
    x = torch.randn(batch, cfg.hidden_size, device=dev).to(torch.bfloat16)
    rope = rope_cos_sin(cfg.rope, cfg.head_dim, capacity, dev)
    fn = _ours_fns([block], x, rope, pos, pos.positions.to(torch.int32), cluster, "dsm")[0]
    for _ in range(LAUNCHES):
        fn()
    torch.cuda.synchronize()


def run_ffn(model: str, batch: int, cluster: int, exchange: str | None) -> None:
    from clusterfuse.models.presets import preset
    from clusterfuse.ops.ffn_block import ffn_block

    cfg, dev = preset(model), "cuda"
    h, i = cfg.hidden_size, cfg.intermediate_size
    x = torch.randn(batch, h, device=dev).to(torch.bfloat16)
    norm_w = torch.ones(h, device=dev, dtype=torch.bfloat16)
    w_gate_up = (torch.randn(2 * i, h, device=dev) * h**-0.5).to(torch.bfloat16)
    w_down = (torch.randn(h, i, device=dev) * i**-0.5).to(torch.bfloat16)
    for _ in range(LAUNCHES):
        ffn_block(x, norm_w, w_gate_up, w_down, cfg.rms_norm_eps, residual=x, cluster_size=cluster, exchange=exchange)
    torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernel", choices=("attention", "ffn"))
    parser.add_argument("--model", default="llama-2-7b", help="a preset (clusterfuse.models.presets)")
    parser.add_argument("--cluster", type=int, required=True, help="cluster size: 1, 2, 4, 8 or 16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024, help="cached keys per sequence (attention)")
    parser.add_argument("--exchange", choices=("dsm", "global", "tuned"), default="dsm", help="FFN activation exchange")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tools.ncu_targets needs a CUDA GPU (Hopper)")
    if args.kernel == "attention":
        run_attention(args.model, args.batch, args.seq_len, args.cluster)
    else:
        run_ffn(args.model, args.batch, args.cluster, None if args.exchange == "tuned" else args.exchange)


if __name__ == "__main__":
    main()
