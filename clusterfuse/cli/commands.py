"""Implementations of the `clusterfuse` sub-commands (argument parsing lives in `main`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from clusterfuse.engine.llm import LLM
from clusterfuse.engine.outputs import RequestOutput
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.models.config import ModelConfig


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_tokens=args.max_tokens, stop=tuple(args.stop), seed=args.seed,
                          ignore_eos=args.ignore_eos)


def _open(args: argparse.Namespace, max_num_seqs: int) -> LLM:
    return LLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend, capacity=args.capacity,
               max_num_seqs=max_num_seqs, seed=args.seed, progress=not args.quiet)


def _report(results: list[RequestOutput], llm: LLM) -> None:
    """Timings of a finished batch. Only generated tokens count: tokens/s and ms per output token over
    the tokens decoded after each request's first one (which its prefill made), from the first first
    token to the last token."""
    runtime = llm.runtime
    where = (f"{runtime.model.source} | {runtime.backend} backend on {runtime.platform.device_name}" if runtime
             else f"{llm.model_name} | {llm.engine.backend_name or 'custom'} backend")
    generated = sum(r.completion_tokens for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    started = [r for r in results if r.first_token_s is not None]
    ttft = max((r.first_token_s - r.arrival_s for r in started), default=float("nan"))
    decoded = sum(max(0, r.completion_tokens - 1) for r in started)
    span = max((r.finished_s for r in started), default=0.0) - min((r.first_token_s for r in started), default=0.0)
    rate = decoded / span if decoded and span > 0 else float("nan")
    line = (f"\n[{where} | batch {len(results)}] prompt {prompt_tokens} tokens, first token after {ttft:.2f} s; "
            f"{generated} tokens generated, {rate:.1f} tokens/s, {1e3 / rate:.1f} ms per output token")
    if len(results) > 1:  # each stream sees its tokens this far apart
        gaps = [(r.finished_s - r.first_token_s) / (r.completion_tokens - 1) for r in started
                if r.completion_tokens > 1]
        line += f" ({1e3 * sum(gaps) / len(gaps):.1f} ms between one stream's tokens)" if gaps else ""
    print(line, file=sys.stderr)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _open(args, max_num_seqs=len(args.prompts))
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [llm.encode_chat([*system, {"role": "user", "content": p}]) for p in args.prompts]
    else:
        prompts = list(args.prompts)
    if len(prompts) == 1:
        stream = llm.stream(prompts[0], params)  # checks the prompt before anything is printed
        _write(args.prompts[0] if not args.chat else "")
        for out in stream:
            _write(out.delta_text)
        results = [out]
        _write("\n")
    else:  # several prompts decode together; print each when all are done
        results = llm.generate(prompts, params)
        for i, (prompt, res) in enumerate(zip(args.prompts, results, strict=True)):
            print(f"--- [{i}] {prompt}{res.text}  ({res.finish_reason})")
    if not args.quiet:
        _report(results, llm)
    return 0


def chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _open(args, max_num_seqs=1)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[tuple[str, str]] = []  # (user, assistant): history is trimmed by whole pairs
    print("clusterfuse chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not user.strip():
            continue
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            turns = []
            continue
        ids = _fit_history(llm, system, turns, user, params.max_tokens)
        if ids is None:
            continue
        for out in llm.stream(ids, params):
            _write(out.delta_text)
        print()
        turns.append((user, out.text))
        if not args.quiet:
            _report([out], llm)


def _fit_history(llm: LLM, system: list[dict[str, str]], turns: list[tuple[str, str]], user: str,
                 max_tokens: int) -> list[int] | None:
    """The prompt ids of the conversation plus ``user``'s message, forgetting the oldest user/assistant
    pairs (in place) until it leaves room for ``max_tokens``; so the history never starts with an
    assistant turn. None, after one line on stderr, when even the message alone does not fit."""
    while True:
        messages = [*system, *(m for u, a in turns for m in ({"role": "user", "content": u},
                                                             {"role": "assistant", "content": a})),
                    {"role": "user", "content": user}]
        ids = llm.encode_chat(messages)
        if len(ids) + max_tokens <= llm.capacity:
            return ids
        if not turns:
            print(f"clusterfuse: message not sent: {len(ids)} tokens + max tokens {max_tokens} exceed the "
                  f"capacity of {llm.capacity} tokens (shorten it, or raise --capacity / lower --max-tokens)",
                  file=sys.stderr)
            return None
        del turns[0]


def info(args: argparse.Namespace) -> int:
    import torch

    from clusterfuse.engine.backend import detect_platform, resolve_backend, resolve_device

    dev = resolve_device(args.device)
    platform = detect_platform(dev)
    print(f"clusterfuse {sys.modules['clusterfuse'].__version__}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'})")
    print(f"device:             {dev} ({platform.device_name})")
    cc = platform.compute_capability
    print(f"compute capability: {f'{cc[0]}.{cc[1]}' if cc else 'n/a'}")
    print(f"nvcc:               {platform.nvcc or 'not found'}")
    reason = platform.fused_unavailable_reason()
    print(f"fused kernels:      {'can run' if reason is None else 'cannot run: ' + reason}")
    print(f"backend (auto):     {resolve_backend('auto', platform)}")
    return 0


def check_fused_shapes(config: ModelConfig, batches: Sequence[int]) -> None:
    """ValueError naming the first of ``config``'s shapes (or ``batches``) that the fused kernels do not
    cover, so that `clusterfuse build` says so before nvcc runs (nvcc would stop at a static_assert).
    The rules are the ops' own (`clusterfuse.engine.backend.fused_shape_problem`)."""
    import torch

    from clusterfuse.engine.backend import FUSED_FAMILIES, fused_shape_problem
    from clusterfuse.ops import attention_block

    name = config.name or config.architecture
    if config.family not in FUSED_FAMILIES:
        raise ValueError(f"model: the fused kernels cover the {', '.join(FUSED_FAMILIES)} families; "
                         f"{name} is {config.family}")
    problem = fused_shape_problem(config, torch.bfloat16)
    if problem is not None and config.family == "deepseek_v2":
        raise ValueError(f"model: {name}: {problem}")
    if problem is not None:
        raise ValueError(f"model: {name} (hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
                         f"{config.num_key_value_heads} KV heads, head_dim {config.head_dim}, intermediate size "
                         f"{config.intermediate_size}): {problem}")
    for b in batches:
        if not 1 <= b <= attention_block.MAX_BATCH:
            raise ValueError(f"--batch: expected batch sizes from 1 to {attention_block.MAX_BATCH}, got {b}")


def build(args: argparse.Namespace) -> int:
    from clusterfuse.engine.kernel_build import prebuild_for_model
    from clusterfuse.models.loader import load_config

    check_fused_shapes(load_config(args.model), args.batch)
    prebuild_for_model(args.model, batches=args.batch, dtype=args.dtype)
    return 0


BENCH_MODULES = {"primitives": "bench.primitives", "attention": "bench.attention_block", "ffn": "bench.ffn_block",
                 "moe": "bench.moe_block", "e2e": "bench.decode_step"}


def bench(args: argparse.Namespace) -> int:
    name = BENCH_MODULES[args.which]
    if importlib.util.find_spec("bench") is None or importlib.util.find_spec(name) is None:
        raise ValueError(f"bench: {args.which} needs a clusterfuse source checkout (the benchmarks live in its "
                         "bench/ folder, which the installed package does not include); run it from the checkout's "
                         f"root: python -m {name}")
    return int(importlib.import_module(name).main(args.args) or 0)
