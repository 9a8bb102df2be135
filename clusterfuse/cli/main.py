"""The `clusterfuse` command: generate, chat, serve, info, build, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from clusterfuse import __version__
from clusterfuse.cli import serve as serve_cli

MODEL_HELP = ("a Hugging Face model directory, a .gguf file, or a preset name "
              "(llama-2-7b, llama-3-8b, deepseek-v2-lite, ...: random weights); "
              "default: the embedded SmolLM2-135M-Instruct GGUF")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "torch", "reference"),
                   help="fused kernels (Hopper only), torch (PyTorch ops under CUDA graphs, any CUDA GPU) or the "
                        "PyTorch reference (default: auto: the first that can run)")
    p.add_argument("--capacity", type=int, default=None,
                   help="KV-cache capacity in tokens per sequence (default: prompt + max tokens)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling and random preset weights")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or statistics")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens,
                   help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterfuse", description="Cluster-fused LLM decoding on Hopper GPUs.")
    parser.add_argument("--version", action="version", version=f"clusterfuse {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue one or more prompts")
    g.add_argument("prompts", nargs="+", help="prompt text (several prompts decode together as a batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    _add_model_args(g)
    _add_sampling_args(g, 128)

    c = sub.add_parser("chat", help="interactive chat with streaming output and history")
    c.add_argument("--system", default=None, help="system message")
    _add_model_args(c)
    _add_sampling_args(c, 512)

    i = sub.add_parser("info", help="device, compute capability, and which backend will run")
    i.add_argument("--device", default="auto")

    b = sub.add_parser("build", help="pre-build the fused kernels for a model's shapes")
    _add_model_args(b)
    b.add_argument("--batch", type=int, nargs="*", default=[1, 2, 4, 8, 16])

    serve_cli.add_parser(sub, _add_model_args)

    bench = sub.add_parser("bench", help="benchmarks (run from a source checkout): primitives, attention, ffn, e2e")
    bench.add_argument("which", choices=("primitives", "attention", "ffn", "e2e"))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="clusterfuse: %(message)s", stream=sys.stderr)
    from clusterfuse.cli import commands  # heavy imports (torch) only after parsing

    handler = {"generate": commands.generate, "chat": commands.chat, "info": commands.info,
               "build": commands.build, "bench": commands.bench,
               "serve": serve_cli.run}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"clusterfuse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
