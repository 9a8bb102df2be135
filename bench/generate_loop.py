"""Time per output token of the engine's generate loop, against the decode step alone.

    python -m bench.generate_loop [--models smollm2-135m,llama-2-7b] [--batches 1,4] [--tokens 64]
        [--prompt-len 32] [--out FILE]

For every model (a preset with seeded random weights, or a model path) and batch, on the fused
backend, one run measures:

* ``engine``: the continuous-batching `LLMEngine` as users run it (``clusterfuse generate``, the
  `LLM` API): a request's time from its first token to its last over its decoded tokens. Each
  engine step queues the next step before the host reads the previous step's tokens
  (clusterfuse/engine/llm_engine.py), so the host's bookkeeping hides behind the GPU's step;
* ``engine_serial``: the same loop with the host waiting for each step to finish before it goes
  on (the backend's forward followed by a device synchronisation): the host's work between steps
  shows as GPU idle time, as in a loop that reads every step's tokens before queuing the next;
* ``graph_replay``: the decode step's CUDA graph replayed back to back at the loop's mean context
  length (``bench.decode_step.time_fused``): no host work at all, the loop's lower bound.

A batch above the largest decode graph (16) runs as several graph replays per engine step; compare
its ``engine`` time per output token with batch 16's to see what a larger batch costs per token.
``--models`` defaults to a small model, where a step is short and the host's share shows, and a
7B one, where it hardly can. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from bench.common import RecordWriter, Timing, dtype_name, int_list, results_dir
from bench.decode_step import time_fused
from clusterfuse.engine.fused_model import FusedModel
from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.loader import load_model

DEFAULT_MODELS = ("smollm2-135m", "llama-2-7b")
REPEATS = 3  # generate calls per variant; the median TPOT is recorded, with the spread


class _SerialBackend:
    """The fused backend, but every decode step waits for the GPU before returning."""

    def __init__(self, model: FusedModel) -> None:
        self.model, self.device = model, model.device
        self.prefill_chunk, self.max_decode_batch = model.prefill_chunk, model.max_decode_batch

    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None):
        return self.model.new_cache(max_batch, capacity, num_pages)

    def prepare_decode(self, cache, batch: int) -> None:
        self.model.prepare_decode(cache, batch)

    def forward(self, input_ids: torch.Tensor, cache, slots=None, *, logits: str = "all") -> torch.Tensor:
        out = self.model.forward(input_ids, cache, slots, logits=logits)
        torch.cuda.synchronize(self.device)
        return out


def _tpot_us(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    """One run of every prompt at once: the first request's time per output token, in µs, from its
    first token on the host to its last (all requests have the same length, so they decode together)."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    first = None
    while engine.has_unfinished():
        first = next((o for o in engine.step() if o.request_id == "0" and o.finished), first)
    return 1e6 * (first.finished_s - first.first_token_s) / (first.completion_tokens - 1)


def _tpot_timing(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> Timing:
    """Median and spread of the loop's time per output token (µs) over `REPEATS` runs, after one run
    that warms up what the loop needs (the engine captured its graphs when it was built)."""
    _tpot_us(engine, prompts, params)
    tpots = sorted(_tpot_us(engine, prompts, params) for _ in range(REPEATS))
    return Timing(median_us=tpots[len(tpots) // 2], min_us=tpots[0], max_us=tpots[-1], repeats=REPEATS, inner=1)


def run(models: Sequence[str], batches: Sequence[int], tokens: int, prompt_len: int, writer: RecordWriter) -> None:
    dev = torch.device("cuda")
    capacity = prompt_len + tokens + 16
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for name in models:
        loaded = load_model(name, device=dev, dtype=torch.bfloat16, seed=0, progress=False)
        config = loaded.config
        model = FusedModel(config, loaded.weights, device=dev)
        tokenizer = ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_ids)
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            prompts = torch.randint(config.vocab_size, (batch, prompt_len), generator=gen).tolist()
            common = dict(model=config.name or name, batch=batch, seq_len=prompt_len + tokens // 2,
                          tokens=tokens, prompt_len=prompt_len)
            for variant, backend in (("engine", model), ("engine_serial", _SerialBackend(model))):
                engine = LLMEngine(backend, tokenizer, capacity=capacity, max_num_seqs=batch)
                t = _tpot_timing(engine, prompts, params)
                writer.append(variant=variant, timing=t, **common)
                print(f"{name} b={batch} {variant}: {t.median_us / 1e3:.3f} ms/token", flush=True)
                del engine
                model.release_graphs()
            if batch > model.max_decode_batch:  # no one graph of this size: the engine runs several per step
                print(f"{name} b={batch} graph_replay: n/a (above the largest decode graph)", flush=True)
                continue
            t, _ = time_fused(model, batch, prompt_len + tokens // 2)
            writer.append(variant="graph_replay", timing=t, **common)
            print(f"{name} b={batch} graph_replay: {t.median_us / 1e3:.3f} ms/token", flush=True)
        del model, loaded
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="presets or model paths")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--out", default=str(results_dir() / "generate_loop.json"))
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.prompt_len < 1:
        raise SystemExit("--tokens: expected >= 2; --prompt-len: expected >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("bench.generate_loop needs a CUDA GPU (Hopper)")
    writer = RecordWriter(args.out, device=torch.device("cuda"), bench="generate_loop",
                          dtype=dtype_name(torch.bfloat16))
    run(args.models.split(","), int_list(args.batches), args.tokens, args.prompt_len, writer)


if __name__ == "__main__":
    main()
