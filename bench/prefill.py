"""Prefill benchmark: prompt tokens per second and time to first token, Llama-3-8B-shaped random
weights, prompts of 1K / 8K / 32K tokens.

    python -m bench.prefill [--model llama-3-8b] [--prompts 1024,8192,32768] [--chunk 2048]
        [--attention flash,cudnn,efficient] [--repeats 5] [--out FILE] [--md FILE]

Variants, one run, one set of weights (held once, in bf16):

* ``clusterfuse``: the engine's prefill (`clusterfuse.engine.prefill`): ``forward(ids[1, T],
  cache, [slot], logits="last")`` into the paged KV cache, in chunks of ``--chunk`` tokens, SDPA
  backends in the default order (`GPU_ATTENTION`);
* ``clusterfuse_sdpa_<name>``: the same with one SDPA backend allowed (``--attention`` lists them):
  the measurement that picks the default order. A backend that cannot run a shape is reported
  and skipped;
* ``torch_sdpa_flash``: a plain PyTorch bf16 prefill, the whole prompt in one pass, contiguous KV,
  cuBLAS + SDPA flash (`bench.baselines.torch_prefill`) — the baseline of issue 43's goal (≥ 90%).

FlashInfer's paged prefill would be the other candidate (issue 43); it is not installed on the device
image, so it is not measured here, and the output and table say so when it is absent.

``time_us`` is the whole prompt's prefill (CUDA events around one eager call, median of
``--repeats``); records add ``tokens_per_s``, ``ttft_ms`` (host wall clock from the prompt's ids
on the host to the first greedy token on the host) and ``peak_memory_GiB`` (torch's peak
allocation during the call, weights and caches included).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.baselines.torch_prefill import TorchPrefill
from bench.common import RecordWriter, dtype_name, int_list, load_records, parse_dtype, results_dir, time_eager
from clusterfuse.engine.prefill import GPU_ATTENTION, SDPA_BACKENDS, PagedPrefill, PrefillOptions
from clusterfuse.engine.torch_model import TorchModel
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights

BASELINE = "torch_sdpa_flash"


def ttft_ms(prefill: Callable[[torch.Tensor], torch.Tensor], prompt: list[int], device: torch.device,
            repeats: int) -> float:
    """Median wall time from the prompt's ids on the host to the first greedy token on the host."""
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ids = torch.tensor(prompt, dtype=torch.long).to(device, non_blocking=True)
        int(prefill(ids).argmax())
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure(writer: RecordWriter, label: str, prefill: Callable[[torch.Tensor], torch.Tensor], prompt: list[int],
            device: torch.device, repeats: int, **fields) -> dict | None:
    """Time ``prefill(ids) -> logits [vocab]`` and append its record; None when it cannot run."""
    ids = torch.tensor(prompt, dtype=torch.long, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        timing = time_eager(lambda: prefill(ids), warmup=1, repeats=repeats, inner=1)
    except RuntimeError as err:  # an SDPA backend that cannot run this shape ("No available kernel")
        print(f"  {label:28s} not measured: {str(err).splitlines()[0]}")
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    first = ttft_ms(prefill, prompt, device, repeats)
    rec = writer.append(variant=label, timing=timing, tokens_per_s=len(prompt) / (timing.median_us * 1e-6),
                        ttft_ms=first, peak_memory_GiB=round(peak, 2), **fields)
    print(f"  {label:28s} {timing.median_us / 1e3:9.1f} ms  {rec['tokens_per_s']:9.0f} tok/s  "
          f"TTFT {first:8.1f} ms  peak {peak:5.1f} GiB", flush=True)
    return rec


def markdown(records: list[dict]) -> str:
    """The table of this run's records: every variant beside the baseline of its prompt length."""
    base = {r["seq_len"]: r["tokens_per_s"] for r in records if r["variant"] == BASELINE}
    lines = [f"Prefill, {records[0]['model']}, {records[0]['dtype']}, {records[0]['device']} "
             f"(torch {records[0]['torch']}, commit {records[0]['git_commit']})", "",
             "| prompt | variant | prefill ms | tokens/s | TTFT ms | peak GiB | vs torch |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(records, key=lambda r: (r["seq_len"], r["variant"] != "clusterfuse", r["variant"])):
        ratio = f"{r['tokens_per_s'] / base[r['seq_len']]:.0%}" if r["seq_len"] in base else "n/a"
        lines.append(f"| {r['seq_len']} | {r['variant']} | {r['time_us'] / 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['ttft_ms']:.1f} | {r['peak_memory_GiB']:.1f} | {ratio} |")
    lines += ["", f"`{records[0]['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="preset name (random weights)")
    parser.add_argument("--prompts", type=int_list, default=[1024, 8192, 32768], help="prompt lengths")
    parser.add_argument("--chunk", type=int, default=PrefillOptions().chunk, help="engine prefill chunk (tokens)")
    parser.add_argument("--attention", default=",".join(GPU_ATTENTION),
                        help="SDPA backends to time one at a time (names: " + ", ".join(SDPA_BACKENDS) + ")")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON records (appended; default "
                        "bench/results/prefill_<gpu>.json)")
    parser.add_argument("--md", type=Path, default=None, help="markdown table of this run's records")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    singles = [a for a in args.attention.split(",") if a]
    PrefillOptions(attention=tuple(singles))  # names checked before the (slow) set-up
    device = torch.device("cuda")
    dtype = parse_dtype(args.dtype)
    gpu = torch.cuda.get_device_name(device).split()[1].lower() if " " in torch.cuda.get_device_name(device) else "gpu"
    out = args.out or results_dir() / f"prefill_{gpu}.json"
    before = len(load_records([out])) if out.exists() else 0

    config = preset(args.model)
    capacity = max(args.prompts) + 16
    weights = random_weights(config, device=device, dtype=dtype, seed=0)
    model = TorchModel(config, weights, device=device)  # prefill only: no decode graph is captured
    del weights  # the model holds the repacked weights; the dict's q/k/v and gate/up tensors go
    gc.collect()
    writer = RecordWriter(out, device=device, bench="prefill", model=config.name, batch=1, dtype=dtype_name(dtype),
                          cluster_size=None)
    gen = torch.Generator().manual_seed(0)
    flashinfer_note = None
    if importlib.util.find_spec("flashinfer") is None:
        flashinfer_note = "FlashInfer is not installed on this machine: its paged prefill was not measured."
        print(flashinfer_note)

    for T in args.prompts:
        prompt = torch.randint(config.vocab_size, (T,), generator=gen).tolist()
        print(f"{config.name} prompt {T}:")
        for label, attention in [("clusterfuse", None)] + [(f"clusterfuse_sdpa_{a}", (a,)) for a in singles]:
            model.prefiller = PagedPrefill(model.ref, PrefillOptions(chunk=args.chunk, attention=attention), model.mm)
            cache = model.new_cache(1, capacity)

            def ours(ids: torch.Tensor, cache=cache) -> torch.Tensor:
                cache.reset(0)
                return model.forward(ids[None], cache, [0], logits="last")[0, 0]

            measure(writer, label, ours, prompt, device, args.repeats, seq_len=T, chunk=args.chunk,
                    attention=list(attention or GPU_ATTENTION))
            del cache, ours
            torch.cuda.empty_cache()
        if not args.no_baseline:
            baseline = TorchPrefill(model.ref, T)
            measure(writer, BASELINE, baseline, prompt, device, args.repeats, seq_len=T, chunk=None,
                    attention=["flash"])
            del baseline
            torch.cuda.empty_cache()

    records = load_records([out])[before:]
    table = markdown(records) + (flashinfer_note + "\n" if flashinfer_note else "")
    print("\n" + table)
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
