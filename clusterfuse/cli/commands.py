"""Implementations of the `clusterfuse` sub-commands (argument parsing lives in `main`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from clusterfuse.engine.generate import GenerationResult
from clusterfuse.engine.runtime import Runtime, open_runtime
from clusterfuse.engine.sampling import SamplingParams


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_tokens=args.max_tokens, stop=tuple(args.stop), seed=args.seed,
                          ignore_eos=args.ignore_eos)


def _open(args: argparse.Namespace, max_batch: int) -> Runtime:
    return open_runtime(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                        capacity=args.capacity, max_batch=max_batch, seed=args.seed, progress=not args.quiet)


def _report(results: list[GenerationResult], runtime: Runtime) -> None:
    r = results[0]
    generated = sum(len(x.token_ids) for x in results)
    prompt_tokens = sum(x.prompt_tokens for x in results)
    print(f"\n[{runtime.model.source} | {runtime.backend} backend on {runtime.platform.device_name} | "
          f"batch {len(results)}] prompt {prompt_tokens} tokens in {sum(x.prefill_s for x in results):.2f} s; "
          f"{generated} tokens generated, {r.decode_steps} decode steps, "
          f"{r.tpot_ms:.1f} ms per output token, {generated / r.decode_s if r.decode_s else float('nan'):.1f} tokens/s",
          file=sys.stderr)


def _stream_to_stdout(_index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    runtime = _open(args, max_batch=len(args.prompts))
    engine = runtime.engine
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = [engine.encode_chat([*system, {"role": "user", "content": p}]) for p in args.prompts]
    else:
        ids = [engine.tokenizer.encode(p) for p in args.prompts]
    if len(ids) == 1:
        sys.stdout.write(args.prompts[0] if not args.chat else "")
        results = engine.generate_ids(ids, params, on_text=_stream_to_stdout)
        sys.stdout.write("\n")
    else:  # several prompts decode together; print each when all are done
        results = engine.generate_ids(ids, params)
        for i, (prompt, res) in enumerate(zip(args.prompts, results, strict=True)):
            print(f"--- [{i}] {prompt}{res.text}  ({res.finish_reason})")
    if not args.quiet:
        _report(results, runtime)
    return 0


def chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    runtime = _open(args, max_batch=1)
    engine = runtime.engine
    history = [{"role": "system", "content": args.system}] if args.system else []
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
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": user})
        ids = engine.encode_chat(history)
        if len(ids) + params.max_tokens > engine.capacity and len(history) > 1:
            # Forget the oldest turns rather than fail: the conversation keeps going.
            while len(history) > 2 and len(engine.encode_chat(history)) + params.max_tokens > engine.capacity:
                del history[1 if args.system else 0]
            ids = engine.encode_chat(history)
        results = engine.generate_ids([ids], params, on_text=_stream_to_stdout)
        print()
        history.append({"role": "assistant", "content": results[0].text})
        if not args.quiet:
            _report(results, runtime)


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


def build(args: argparse.Namespace) -> int:
    from clusterfuse.engine.kernel_build import prebuild_for_model

    prebuild_for_model(args.model, batches=args.batch, dtype=args.dtype)
    return 0


def bench(args: argparse.Namespace) -> int:
    modules = {"primitives": "bench.primitives", "attention": "bench.attention_block", "ffn": "bench.ffn_block",
               "e2e": "bench.decode_step"}
    try:
        module = importlib.import_module(modules[args.which])
    except ImportError as e:
        raise ValueError(f"bench: cannot import {modules[args.which]} ({e}); run from a clusterfuse source "
                         "checkout (the benchmarks live in its bench/ folder)") from e
    return int(module.main(args.args) or 0)
