"""End-to-end decode benchmark: milliseconds per output token of a whole model.

    python -m bench.decode_step [--models llama-2-7b,llama-3-8b] [--batches 1,4,16]
        [--seq-lens 1024,4096,8192,16384] [--dtype bf16] [--hf] [--qk-norm-ablation]
        [--persistent-ablation [--step-clusters 4,8,16]] [--out FILE] [--md FILE] [--png FILE]

``--models``: any Llama-family preset (`clusterfuse.models.presets`), e.g. ``qwen3-8b``,
``qwen3-0.6b``, ``llama-3.2-1b``, ``llama-3.2-3b`` beside Llama-2/3, or ``deepseek-v2-lite``. Variants,
measured in one run on random weights (seeded, initialised on the GPU):

* ``clusterfuse``: the fused backend's decode step (`FusedModel`: one fused attention and one
  fused FFN kernel per layer; for DeepSeek-V2 `FusedDeepseekModel`: the fused MLA block, then the
  FFN block on the dense layers and the MoE block on the others; final norm + LM head), one
  CUDA-graph replay per step, reading a paged KV (or latent) cache that holds S random tokens per
  sequence;
* ``clusterfuse_no_qk_norm``: with ``--qk-norm-ablation``, for a model with QK-norm (Qwen3), the
  same step of the same shapes with QK-norm off (the attention kernel's build without it): what
  QK-norm costs (issue 40 asks under 2% of the Qwen3-8B step);
* ``clusterfuse_persistent``: with ``--persistent-ablation``, for the Llama family, the same
  step with every layer in one launch (`FusedModel(step="persistent")`, `clusterfuse.ops.decode_step`;
  issue 42), timed beside ``clusterfuse`` in the same run; where the device refuses its residency the
  configuration is not recorded (said in the output). With ``--step-clusters``, one record per
  cluster size N of the step instead (``cluster_size`` N: the report's column
  ``clusterfuse_persistent@cN``; one model, the sizes timed one after the other), to choose the
  step's cluster size by measurement;
* ``torch_cuda_graph``: the gpt-fast-style PyTorch decode step under one CUDA graph
  (`bench.baselines.gpt_fast_decode`: static contiguous caches, one length for the whole batch;
  QK-norm where the model has it);
* ``torch_backend``: the engine's portable backend (`clusterfuse.engine.torch_model`: the same kind
  of step over the paged cache, with graph buckets and context classes as the fused backend),
  with ``--torch-backend``;
* ``hf_transformers``: Hugging Face ``generate`` (eager, dynamic cache), with ``--hf``, batch 1
  at the smallest S only (it is slow and memory-hungry);
* the floor: weight + KV bytes a step must read once, over the GEMV bandwidth of this run (for
  DeepSeek-V2 the active weights: the router, the shared experts and ``batch x top-k`` routed
  experts per MoE layer, capped at all of them; and the latent KV rows: `bench.floor`).

The baselines (``torch_cuda_graph``, ``torch_backend``, ``hf_transformers``) are Llama-family
only: for DeepSeek-V2 they are skipped, and the run says so.

Configurations whose KV cache does not fit in free memory are skipped (said in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from collections.abc import Sequence

import torch

from bench.baselines.gpt_fast_decode import build as build_gpt_fast
from bench.baselines.gpt_fast_decode import time_decode_step
from bench.common import (
    RecordWriter,
    add_kernel_option_args,
    add_report_args,
    decode_step_bytes,
    dtype_name,
    floor_us,
    int_list,
    kernel_options,
    kv_cache_bytes,
    measure_gemv_bandwidth,
    option_fields,
    parse_dtype,
    results_dir,
    time_eager,
    write_report,
)
from clusterfuse.engine.decode_graphs import PagedBackend
from clusterfuse.engine.fused_deepseek import FusedDeepseekModel
from clusterfuse.engine.fused_model import FusedModel, bucket_for, seq_class_for
from clusterfuse.engine.torch_model import TorchModel
from clusterfuse.models.config import ModelConfig
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights

#: Leave this much GPU memory free beside the KV cache (activations, workspaces, the graph pool).
HEADROOM_BYTES = 4 * 2**30


def _fits(config: ModelConfig, batch: int, seq_len: int, dtype_bytes: int, with_weights: bool = False) -> bool:
    """Whether a KV cache for ``batch`` x ``seq_len`` tokens (and, ``with_weights``, the model's
    weights, for a model not built yet) fits in free GPU memory beside `HEADROOM_BYTES`."""
    free, _ = torch.cuda.mem_get_info()
    need = kv_cache_bytes(config, batch * (seq_len + 16), dtype_bytes) + HEADROOM_BYTES
    if with_weights:
        # The step's weights (LM head included) and the whole embedding table (it reads only rows).
        need += decode_step_bytes(config, 1, 0, dtype_bytes).weights + config.vocab_size * config.hidden_size \
            * dtype_bytes
    return need < free


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


#: Kernel-name fragments -> the part of the decode step they belong to (per-kernel breakdown).
KERNEL_PARTS = (("attention_block", "attention"), ("mla_block", "attention"), ("ffn_block", "ffn"),
                ("moe_block", "moe"), ("decode_step_kernel", "layers"), ("gemm", "lm_head"), ("gemv", "lm_head"),
                ("splitK", "lm_head"), ("nvjet", "lm_head"))
#: Model families with a fused decode step here; the baselines are Llama-family only.
FUSED_BACKENDS = {"llama": FusedModel, "deepseek_v2": FusedDeepseekModel}


def kernel_breakdown(replay, steps: int = 10) -> dict[str, float]:
    """GPU time per decode step (µs) by part: fused attention, fused FFN (or every layer in the
    persistent step's one kernel: "layers"), LM head, the rest (embedding, final norm, casts).
    Kernel durations from the profiler's CUPTI trace of graph replays; empty if the profiler sees
    no kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    parts: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA or not evt.device_time:
            continue
        part = next((p for frag, p in KERNEL_PARTS if frag in evt.name), "other")
        parts[part] = parts.get(part, 0.0) + evt.device_time / steps
    return parts


def filled_cache(model: PagedBackend, batch: int, seq_len: int):
    """``(cache, slots, ids)``: a paged cache whose ``batch`` slots each hold ``seq_len`` random
    rows (pages allocated), and random next-token ids: what a decode step at that length reads."""
    cache = model.new_cache(batch, seq_len + 16)
    slots = list(range(batch))
    cache.check_room(slots, seq_len)  # allocate the pages S rows need
    cache.advance(slots, seq_len)
    gen = torch.Generator(device=model.device).manual_seed(seq_len)
    for pool in (*cache.k_pools, *cache.v_pools):  # random, never zeros: real data paths
        pool.normal_(generator=gen)
    ids = torch.randint(model.config.vocab_size, (batch,), device=model.device, generator=gen)
    return cache, slots, ids


def time_fused(model: PagedBackend, batch: int, seq_len: int, breakdown: bool = False):
    """Median time of one decode step of ``model`` (fused or torch backend) at ``seq_len`` cached
    tokens per sequence, and (with ``breakdown``) the step's GPU time by part (`kernel_breakdown`)."""
    cache, slots, ids = filled_cache(model, batch, seq_len)
    graph = model._graph(cache, bucket_for(batch, model.batch_buckets),  # as forward() picks
                         seq_class_for(seq_len + 1, cache.capacity))
    graph.run(ids, slots)  # fills the static buffers; replays below reuse them
    timing = time_eager(graph.graph.replay, warmup=5, repeats=30, inner=1)
    parts = kernel_breakdown(graph.graph.replay) if breakdown else {}
    del graph, cache
    model.release_graphs()
    return timing, parts


def time_hf(config: ModelConfig, seq_len: int, dtype: torch.dtype, tokens: int = 16):
    """Hugging Face generate, batch 1: time per output token after a ``seq_len``-token prompt."""
    import transformers

    # Qwen3's class for QK-norm; head_dim explicit (Qwen3-0.6B: heads x head_dim != hidden).
    family = "Qwen3" if config.qk_norm else "Llama"
    hf_config = getattr(transformers, f"{family}Config")(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope.theta, max_position_embeddings=max(config.max_position_embeddings, seq_len + tokens))
    with torch.device("cuda"):
        model = getattr(transformers, f"{family}ForCausalLM")(hf_config).to(dtype).eval()
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


def _step_clusters(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[int] | None:
    """``--step-clusters`` as sizes the step takes (None: not given); a usage error otherwise."""
    if args.step_clusters is None:
        return None
    if not args.persistent_ablation:
        p.error("--step-clusters: needs --persistent-ablation")
    from clusterfuse.ops.decode_step import CLUSTER_SIZES

    try:
        sizes = int_list(args.step_clusters)
    except ValueError:
        p.error(f"--step-clusters: expected sizes like 4,8,16, got {args.step_clusters!r}")
    bad = [c for c in sizes if c not in CLUSTER_SIZES]
    if bad or not sizes:
        p.error(f"--step-clusters: expected sizes among {CLUSTER_SIZES}, got {args.step_clusters!r}")
    return sizes


def _step_clusters_of(variant: str, step_clusters: list[int] | None) -> list[int | None]:
    """The step cluster sizes a model variant is timed at (None: its own, once)."""
    if variant != "clusterfuse_persistent" or step_clusters is None:
        return [None]
    return list(step_clusters)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-2-7b,llama-3-8b")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--seq-lens", default="1024,4096,8192,16384")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face generate (batch 1, smallest S)")
    p.add_argument("--no-baseline", action="store_true", help="skip the gpt-fast baseline")
    p.add_argument("--breakdown", action="store_true", help="record the fused step's GPU time per kernel kind")
    p.add_argument("--torch-backend", action="store_true", help="also time the engine's torch backend")
    p.add_argument("--qk-norm-ablation", action="store_true",
                   help="for models with QK-norm (Qwen3), also time the fused step with QK-norm off "
                        "(variant clusterfuse_no_qk_norm) and print what QK-norm costs")
    p.add_argument("--persistent-ablation", action="store_true",
                   help="for the Llama family, also time the persistent decode step (variant "
                        "clusterfuse_persistent: every layer in one launch) beside the per-block one")
    p.add_argument("--step-clusters", default=None,
                   help="with --persistent-ablation: time the persistent step at each of these cluster sizes "
                        "(records with cluster_size N) instead of the engine's default size")
    add_kernel_option_args(p)
    add_report_args(p, None)
    args = p.parse_args(argv)
    options = kernel_options(args)
    names = args.models.split(",")
    for name in names:  # before anything runs: a bad name is a usage error (exit 2)
        try:
            config = preset(name)
        except ValueError as err:
            p.error(f"--models: {err}")
        if config.family not in FUSED_BACKENDS:
            p.error(f"--models: {name} is a {config.family} model; the fused decode engine runs "
                    f"{', '.join(FUSED_BACKENDS)}")
    step_clusters = _step_clusters(p, args)
    if not torch.cuda.is_available():
        raise SystemExit("bench decode_step: needs a CUDA GPU")

    dtype = parse_dtype(args.dtype)
    dbytes = torch.empty(0, dtype=dtype).element_size()
    gpu = torch.cuda.get_device_name().split()[1].lower() if " " in torch.cuda.get_device_name() else "gpu"
    out = args.out or results_dir() / f"decode_step_{gpu}.json"
    bandwidth = measure_gemv_bandwidth()
    writer = RecordWriter(out, bench="decode_step", dtype=dtype_name(dtype), bandwidth_GBs=bandwidth,
                          **option_fields(options))
    batches, seq_lens = int_list(args.batches), int_list(args.seq_lens)
    print(f"GEMV bandwidth {bandwidth:.0f} GB/s; results -> {out}")

    def record(model: str, batch: int, s: int, variant: str, timing=None, time_us=None, parts=None,
               cluster_size: int | None = None) -> None:
        config = preset(model)
        floor = floor_us(decode_step_bytes(config, batch, s, dbytes), bandwidth)
        extra = {"time_us": time_us} if time_us is not None else {}
        if cluster_size is not None:
            extra["cluster_size"] = cluster_size
        if parts:
            extra["breakdown_us"] = {k: round(v, 2) for k, v in sorted(parts.items())}
        rec = writer.append(model=model, batch=batch, seq_len=s, variant=variant, timing=timing,
                            floor_us=floor, **extra)
        label = variant if cluster_size is None else f"{variant}@c{cluster_size}"
        print(f"{model:12s} B={batch:2d} S={s:6d} {label:18s} {rec['time_us'] / 1e3:7.3f} ms/token "
              f"(floor {floor / 1e3:.3f} ms, {floor / rec['time_us']:.0%} of floor)", flush=True)
        if parts:
            print("    GPU time per step: " + ", ".join(f"{k} {v:.1f} µs" for k, v in sorted(parts.items())))

    for name in names:
        config = preset(name)
        fused_variants = [("clusterfuse", config, {})]
        if args.qk_norm_ablation and config.qk_norm:
            fused_variants.append(("clusterfuse_no_qk_norm", dataclasses.replace(config, qk_norm=False), {}))
        if args.persistent_ablation and config.family == "llama":
            fused_variants.append(("clusterfuse_persistent", config, {"step": "persistent"}))
        # Every variant's model is built before any is timed, and each configuration times them one
        # after the other, so that a difference of a few percent is not clock or thermal drift.
        fused = FUSED_BACKENDS[config.family]
        models = [(variant, fused(c, random_weights(c, device="cuda", dtype=dtype, seed=0), device="cuda",
                                  kernel_options=options, **kw)) for variant, c, kw in fused_variants]
        for b in batches:
            for s in seq_lens:
                if not _fits(config, b, s, dbytes):
                    print(f"{name} B={b} S={s}: KV cache does not fit, skipped")
                    continue
                step_us = {}
                for variant, model in models:
                    for cluster in _step_clusters_of(variant, step_clusters):
                        label = variant if cluster is None else f"{variant}@c{cluster}"
                        if cluster is not None:
                            # One model for every size: its graphs are released after each timing, and
                            # the next capture reads the size (FusedModel._persistent_layers).
                            model.step_cluster = cluster
                            model.persistent_refused.clear()
                        timing, parts = time_fused(model, b, s, breakdown=args.breakdown)
                        refused = getattr(model, "persistent_refused", {}).get(bucket_for(b))
                        if label.startswith("clusterfuse_persistent") and refused:
                            print(f"{name} B={b} S={s} {label}: persistent step refused, ran per block: {refused}")
                        else:
                            record(name, b, s, variant, timing, parts=parts, cluster_size=cluster)
                            step_us[label] = timing.median_us
                        _release()
                for label, one in step_us.items():
                    if label.startswith("clusterfuse_persistent"):
                        per = step_us["clusterfuse"]
                        print(f"{name:12s} B={b:2d} S={s:6d} {label} {one / 1e3:.3f} ms against per-block "
                              f"{per / 1e3:.3f} ms: {per / one:.3f}x")
                if "clusterfuse_no_qk_norm" in step_us:
                    on, off = step_us["clusterfuse"], step_us["clusterfuse_no_qk_norm"]
                    print(f"{name:12s} B={b:2d} S={s:6d} QK-norm costs {on - off:+.1f} µs, "
                          f"{on / off - 1:+.2%} of the step")
        del models
        _release()
        if config.family != "llama":
            print(f"{name}: the baselines (torch_cuda_graph, torch_backend, hf_transformers) run the Llama "
                  "family only; skipped")
            continue
        if args.torch_backend:
            model = TorchModel(config, random_weights(config, device="cuda", dtype=dtype, seed=0), device="cuda")
            for b in batches:
                for s in seq_lens:
                    if _fits(config, b, s, dbytes):
                        record(name, b, s, "torch_backend", time_fused(model, b, s)[0])
                        _release()
            del model
            _release()
        if not args.no_baseline:
            for b in batches:
                fitting = [s for s in seq_lens if _fits(config, b, s, dbytes, with_weights=True)]
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

    write_report(out, args.md, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
