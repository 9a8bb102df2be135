"""The `clusterfuse` command: generate, chat, serve, info, build, bench.

Errors, one policy for every sub-command: a user error (a bad argument, a bad model file, a
refused kernel cache: ``ValueError`` and the file errors) is one line on stderr naming what was
wrong and what was expected, exit code 2; arguments are checked here, at parse time, before
anything is loaded.  Any other exception is a bug: it keeps its traceback (exit 1).  A closed
stdout (``clusterfuse generate ... | head -c 5``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from clusterfuse import __version__
from clusterfuse.cli import serve as serve_cli

MODEL_HELP = ("a Hugging Face model directory, a Hugging Face Hub id (org/name[@revision], through the "
              "Hugging Face cache; HF_HUB_OFFLINE=1: the cache only), a .gguf file, or a preset name "
              "(llama-2-7b, llama-3-8b, llama-3.2-1b, qwen3-8b, qwen3-0.6b, deepseek-v2-lite, ...: random "
              "weights); default: the embedded SmolLM2-135M-Instruct GGUF")
#: The exceptions that are the user's to fix (bad input), reported in one line with exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
#: Generous upper bounds: a value past them is a typo, and would only fail later, slower.
MAX_TOKENS_LIMIT = 1 << 24
MAX_CAPACITY = 1 << 24
DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command ended by SIGPIPE


class UsageError(Exception):
    """A bad command line (raised instead of argparse's exit so `main` reports it like other user errors)."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage dump) and reach `main`'s handler."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("clusterfuse").strip()  # "generate" in a sub-command's parser
        raise UsageError(f"{command}: {message}" if command else message)


# ------------------------------------------------------------------------------- argument types
# Each raises argparse.ArgumentTypeError; argparse prefixes the message with "argument --name:".
def _int_in(lo: int, hi: int) -> argparse._ActionType:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?\d+", text.strip()):
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}")
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _float_in(lo: float, hi: float, *, lo_open: bool = False) -> argparse._ActionType:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _text(text: str) -> str:
    """Text that is valid UTF-8 (argv bytes that are not arrive as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8 text") from None
    return text


def _stop_string(text: str) -> str:
    if not _text(text):
        raise argparse.ArgumentTypeError("expected a non-empty stop string")
    return text


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _revision(text: str) -> str:
    from clusterfuse.models.hub import is_revision  # no torch: a regular expression

    if not is_revision(text):
        raise argparse.ArgumentTypeError(f"expected a branch, tag or commit hash, got {text!r}")
    return text


def _with_revision(args: argparse.Namespace) -> None:
    """Fold ``--revision`` into ``--model`` (``org/name@revision``), the one spelling the loader reads."""
    revision = getattr(args, "revision", None)
    if revision is None:
        return
    from clusterfuse.models.hub import parse_hub_id  # no torch: a regular expression

    hub = None if args.model is None else parse_hub_id(args.model)
    if hub is None or hub[1] is not None:
        raise ValueError(f"--revision: applies to a Hugging Face Hub id --model org/name (without @revision), "
                         f"got --model {args.model!r}")
    args.model = f"{args.model}@{revision}"


def _dtype(text: str) -> str:
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPE_NAMES)}, got {text!r}")
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--revision", default=None, type=_revision,
                   help="branch, tag or commit of a Hub id --model (default: main; same as --model org/name@REV)")
    p.add_argument("--device", default="auto", type=_device, help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", type=_dtype,
                   help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "torch", "reference"),
                   help="fused kernels (Hopper only), torch (PyTorch ops under CUDA graphs, any CUDA GPU) or the "
                        "PyTorch reference (default: auto: the first that can run)")
    p.add_argument("--capacity", type=_int_in(1, MAX_CAPACITY), default=None,
                   help="KV-cache capacity in tokens per sequence (default: min(the model's max positions, 4096))")
    p.add_argument("--seed", type=_int_in(0, (1 << 63) - 1), default=None,
                   help="seed for sampling and random preset weights")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, statistics or INFO logs")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-n", type=_int_in(1, MAX_TOKENS_LIMIT), default=max_tokens,
                   help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", "-t", type=_float_in(0.0, 100.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_int_in(0, 1 << 24), default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--stop", action="append", type=_stop_string, default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clusterfuse", description="Cluster-fused LLM decoding on Hopper GPUs.")
    parser.add_argument("--version", action="version", version=f"clusterfuse {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue one or more prompts")
    g.add_argument("prompts", nargs="+", type=_text,
                   help="prompt text (several prompts decode together as a batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    g.add_argument("--system", default=None, type=_text, help="system message (with --chat)")
    _add_model_args(g)
    _add_sampling_args(g, 128)

    c = sub.add_parser("chat", help="interactive chat with streaming output and history")
    c.add_argument("--system", default=None, type=_text, help="system message")
    _add_model_args(c)
    _add_sampling_args(c, 512)

    i = sub.add_parser("info", help="device, compute capability, and which backend will run")
    i.add_argument("--device", default="auto", type=_device, help="cpu, cuda, cuda:N or auto (default: auto)")

    b = sub.add_parser("build", help="pre-build the fused kernels for a model's shapes")
    _add_model_args(b)
    b.add_argument("--batch", type=_int_in(1, 16), nargs="*", default=[1, 2, 4, 8, 16],
                   help="batch sizes to build for, 1 to 16 (default: 1 2 4 8 16)")

    serve_cli.add_parser(sub, _add_model_args)

    bench = sub.add_parser("bench", help="benchmarks (run from a source checkout): primitives, attention, ffn, e2e")
    bench.add_argument("which", choices=("primitives", "attention", "ffn", "moe", "e2e"))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


class _CliLogHandler(logging.StreamHandler):
    """The handler `main` puts on the "clusterfuse" logger (a type of its own, so a second `main` in the
    same process replaces it instead of adding another).  It writes to whatever ``sys.stderr`` is at
    the time of the record, not the stream of the first call (tests swap stderr)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201 - logging's attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001 - set by StreamHandler.__init__; stderr is looked up instead
        pass


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Log records of the "clusterfuse" logger to stderr: DEBUG with --verbose, WARNING and up with
    --quiet, else INFO.  Only the command does this; the library configures no handler and never
    touches the root logger."""
    logger = logging.getLogger("clusterfuse")
    for h in [h for h in logger.handlers if isinstance(h, _CliLogHandler)]:
        logger.removeHandler(h)
    handler = _CliLogHandler()
    handler.setFormatter(logging.Formatter("clusterfuse: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")).strip()
    return text or type(e).__name__


def _quiet_broken_pipe() -> int:
    """stdout's reader went away: point stdout at /dev/null so the interpreter's final flush does not
    complain, and end with the shell's SIGPIPE status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"clusterfuse: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.verbose, getattr(args, "quiet", False))
    try:
        _with_revision(args)
        from clusterfuse.cli import commands  # heavy imports (torch) only after parsing

        handler = {"generate": commands.generate, "chat": commands.chat, "info": commands.info,
                   "build": commands.build, "bench": commands.bench, "serve": serve_cli.run}[args.command]
        status = handler(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handler, not at interpreter exit
        return status
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except USER_ERRORS as e:
        print(f"clusterfuse: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
