"""End-to-end decode benchmark: milliseconds per output token of a whole model.

    python -m bench.decode_step [--models llama-2-7b,llama-3-8b] [--batches 1,4,16]
        [--seq-lens 1024,4096,8192,16384] [--dtype bf16] [--hf] [--out FILE] [--md FILE] [--png FILE]

Variants, measured in one run on random weights (seeded, initialised on the GPU):

* ``clusterfuse``: the fused backend's decode step (`FusedModel`: one fused attention and one
  fused FFN kernel per layer, final norm + LM head), one CUDA-graph replay per step, reading
  a paged KV cache that holds S random tokens per sequence;
* ``torch_cuda_graph``: the gpt-fast-style PyTorch decode step under one CUDA graph
  (`bench.baselines.gpt_fast_decode`);
* ``hf_transformers``: Hugging Face ``generate`` (eager, dynamic cache), with ``--hf``, batch 1
  at the smallest S only (it is slow and memory-hungry);
* the floor: weight + KV bytes a step must read once, over the GEMV bandwidth of this run.

Configurations whose KV cache does not fit in free memory are skipped (said in the output).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.baselines.gpt_fast_decode import build as build_gpt_fast
from bench.baselines.gpt_fast_decode import time_decode_step
from bench.common import (
    RecordWriter,
    decode_step_bytes,
    dtype_name,
    floor_us,
    kv_cache_bytes,
    measure_gemv_bandwidth,
    parse_dtype,
    results_dir,
    time_eager,
)
from clusterfuse.engine.fused_model import FusedModel, bucket_for
from clusterfuse.models.config import ModelConfig
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights

#: Leave this much GPU memory free beside the KV cache (activations, workspaces, the graph pool).
HEADROOM_BYTES = 4 * 2**30


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _fits(config: ModelConfig, batch: int, seq_len: int, dtype_bytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return kv_cache_bytes(config, batch * (seq_len + 16), dtype_bytes) + HEADROOM_BYTES < free


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def time_fused(model: FusedModel, batch: int, seq_len: int):
    """Median time of one fused decode step at ``seq_len`` cached tokens per sequence."""
    cache = model.new_cache(batch, seq_len + 16)
    slots = list(range(batch))
    cache.check_room(slots, seq_len)  # allocate the pages S rows need
    cache.advance(slots, seq_len)
    gen = torch.Generator(device=model.device).manual_seed(seq_len)
    for pool in (*cache.k_pools, *cache.v_pools):  # random, never zeros: real data paths
        pool.normal_(generator=gen)
    graph = model._graph(cache, bucket_for(batch))
    ids = torch.randint(model.config.vocab_size, (batch,), device=model.device, generator=gen)
    graph.run(ids, slots)  # fills the static buffers; replays below reuse them
    timing = time_eager(graph.graph.replay, warmup=5, repeats=30, inner=1)
    del graph, cache
    model._graphs.clear()
    return timing


def time_hf(config: ModelConfig, seq_len: int, dtype: torch.dtype, tokens: int = 16):
    """Hugging Face generate, batch 1: time per output token after a ``seq_len``-token prompt."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope.theta, max_position_embeddings=max(config.max_position_embeddings, seq_len + tokens))
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    prompt = torch.randint(config.vocab_size, (1, seq_len), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad():
        run(2)  # warm-up
        short, long = run(1), run(tokens + 1)
    return 1e6 * (long - short) / tokens  # µs per token, prefill cancelled out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-2-7b,llama-3-8b")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--seq-lens", default="1024,4096,8192,16384")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face generate (batch 1, smallest S)")
    p.add_argument("--no-baseline", action="store_true", help="skip the gpt-fast baseline")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench decode_step: needs a CUDA GPU")

    dtype = parse_dtype(args.dtype)
    dbytes = torch.empty(0, dtype=dtype).element_size()
    gpu = torch.cuda.get_device_name().split()[1].lower() if " " in torch.cuda.get_device_name() else "gpu"
    out = Path(args.out) if args.out else results_dir() / f"decode_step_{gpu}.json"
    bandwidth = measure_gemv_bandwidth()
    writer = RecordWriter(out, bench="decode_step", dtype=dtype_name(dtype), bandwidth_GBs=bandwidth)
    batches, seq_lens = _ints(args.batches), _ints(args.seq_lens)
    print(f"GEMV bandwidth {bandwidth:.0f} GB/s; results -> {out}")

    def record(model: str, batch: int, s: int, variant: str, timing=None, time_us=None) -> None:
        config = preset(model)
        floor = floor_us(decode_step_bytes(config, batch, s, dbytes), bandwidth)
        rec = writer.append(model=model, batch=batch, seq_len=s, variant=variant, timing=timing,
                            floor_us=floor, **({"time_us": time_us} if time_us is not None else {}))
        print(f"{model:12s} B={batch:2d} S={s:6d} {variant:18s} {rec['time_us'] / 1e3:7.3f} ms/token "
              f"(floor {floor / 1e3:.3f} ms, {floor / rec['time_us']:.0%} of floor)", flush=True)

    for name in args.models.split(","):
        config = preset(name)
        model = FusedModel(config, random_weights(config, device="cuda", dtype=dtype, seed=0), device="cuda")
        for b in batches:
            for s in seq_lens:
                if not _fits(config, b, s, dbytes):
                    print(f"{name} B={b} S={s}: KV cache does not fit, skipped")
                    continue
                record(name, b, s, "clusterfuse", time_fused(model, b, s))
                _release()
        del model
        _release()
        if not args.no_baseline:
            for b in batches:
                fitting = [s for s in seq_lens if _fits(config, b, s, dbytes)]
                if not fitting:
                    continue
                decoder = build_gpt_fast(config, b, max(fitting) + 16, dtype=dtype)
                for s in fitting:
                    record(name, b, s, "torch_cuda_graph", time_decode_step(decoder, s))
                del decoder
                _release()
        if args.hf:
            s = min(seq_lens)
            record(name, 1, s, "hf_transformers", time_us=time_hf(config, s, dtype))
            _release()

    if args.md or args.png:
        from bench.report import main as report_main

        report_main([str(out), *(["--md", args.md] if args.md else []), *(["--png", args.png] if args.png else [])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
