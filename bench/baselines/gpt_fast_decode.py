"""A gpt-fast-style whole-model decode step in plain PyTorch: the end-to-end baseline.

Static per-layer KV caches, fused QKV and gate/up weights, every layer, final RMSNorm,
LM head and greedy argmax, the whole step captured in one CUDA graph.  Random weights
are generated directly on the GPU from a preset, so no checkpoint is needed.
DESIGN.md measured 7.61 ms/token for Llama-2-7B at S=1024 (fp16, H100).

The attention length is baked into a captured graph (keys ``0..S``), so a graph is
captured per sequence length: `set_seq_len` drops the old one.  Timed steps all decode
at the same position (each replay rewrites the same cache slot), which is the cost of
one token at that length.

    dec = build(preset("llama-2-7b"), batch=1, capacity=1025, dtype=torch.float16)
    print(time_decode_step(dec, 1024).median_us / 1e3, "ms/token")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench.baselines.torch_blocks import (
    DecodePositions,
    Device,
    TorchAttentionBlock,
    TorchFFNBlock,
    random_tensor,
    rope_tables,
)
from bench.common import Timing, capture_graph, time_cuda_graph
from clusterfuse.models.config import ModelConfig


class GptFastDecoder:
    """All layers of a Llama-family model with random weights and a static KV cache."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, *, dtype: torch.dtype = torch.float16,
                 device: Device = "cuda", seed: int = 0) -> None:
        self.config, self.batch = config, batch
        self.positions = DecodePositions(batch, capacity, device)
        self.rope_tables = rope_tables(config, capacity, device)  # shared: one gather per step
        self.layers = [
            (TorchAttentionBlock(config, batch, capacity, dtype=dtype, device=device, seed=seed + 2 * i + 1,
                                 positions=self.positions, rope=self.rope_tables),
             TorchFFNBlock(config, dtype=dtype, device=device, seed=seed + 2 * i + 2))
            for i in range(config.num_hidden_layers)
        ]
        gen = torch.Generator(device=device).manual_seed(seed)
        h = config.hidden_size
        self.embedding = random_tensor(gen, (config.vocab_size, h), 1.0, dtype, device)
        self.final_norm = random_tensor(gen, (h,), 0.1, dtype, device, shift=1.0)
        self.lm_head = (self.embedding if config.tie_word_embeddings
                        else random_tensor(gen, (config.vocab_size, h), h**-0.5, dtype, device))
        self.tokens = torch.randint(config.vocab_size, (batch,), generator=gen, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.set_seq_len(0)

    def set_seq_len(self, seq_len: int | Sequence[int]) -> None:
        """Decode the next token of sequences holding ``seq_len`` cached tokens (per sequence or one for all)."""
        self.positions.set(seq_len)
        self.graph = None  # the attention length is baked into a graph

    def forward(self) -> torch.Tensor:
        """One eager decode step: reads `tokens`, writes the greedy next tokens back into it."""
        x = F.embedding(self.tokens, self.embedding)
        rope = self.positions.rope(*self.rope_tables)
        for attention, ffn in self.layers:
            x = ffn(attention(x, rope))
        x = F.rms_norm(x, (x.shape[-1],), self.final_norm, self.config.rms_norm_eps)
        logits = F.linear(x, self.lm_head)
        self.tokens.copy_(logits.argmax(dim=-1))
        return self.tokens

    def step(self) -> torch.Tensor:
        """One decode step as a CUDA-graph replay (captured on first use after `set_seq_len`)."""
        if self.graph is None:
            self.graph = capture_graph(self.forward)
        self.graph.replay()
        return self.tokens


def build(config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype = torch.float16,
          device: Device = "cuda", seed: int = 0) -> GptFastDecoder:
    """A decoder for ``config`` whose caches hold ``capacity`` tokens per sequence."""
    if config.family != "llama":
        raise ValueError(f"{config.name}: the gpt-fast baseline covers the Llama family only")
    return GptFastDecoder(config, batch, capacity, dtype=dtype, device=device, seed=seed)


def time_decode_step(decoder: GptFastDecoder, seq_len: int | Sequence[int], *, warmup: int = 5,
                     repeats: int = 20) -> Timing:
    """Time of one decode step (µs; divide by 1000 for ms/token) at ``seq_len`` cached tokens,
    one step per CUDA-graph replay: no rotation needed, a step reads gigabytes."""
    decoder.set_seq_len(seq_len)
    return time_cuda_graph(decoder.forward, warmup=warmup, repeats=repeats, inner=1)
