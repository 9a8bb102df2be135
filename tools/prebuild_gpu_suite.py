"""Build every kernel library the GPU test suite and the block benchmarks use, in parallel.

    python tools/prebuild_gpu_suite.py [--cache DIR] [--jobs N]

tools/gpu_run.sh's ``build`` stage runs it on the GPU machine. Run here with ``--cache .kcache``
(nvcc needs no GPU) and pack the folder (tools/pack_kcache.py) for the device call, which
unpacks it into ./.kcache, its default cache: the device then builds nothing (the cache key
holds the sources, defines, nvcc version, arch and flags, not the machine; clusterfuse.ops.build).
The profiling build (the attention timeline) is left to its benchmark's JIT build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterfuse.ops import attention_block, decode_step, ffn_block, mla_block, moe_block  # noqa: E402
from clusterfuse.ops.build import BuildSpec, prebuild, unique_specs  # noqa: E402
from clusterfuse.ops.primitives import all_library_specs  # noqa: E402

#: (head_dim, GQA ratio) of the shapes the tests and the benchmarked models use: SmolLM2,
#: Llama-2, Llama-3, Qwen2, GQA 8; Qwen3-0.6B (GQA 2), Llama-3.2-1B (hd 64, GQA 4), Llama-3.2-3B (GQA 3).
SHAPES = ((64, 3), (128, 1), (128, 4), (64, 7), (128, 8), (128, 2), (64, 4), (128, 3))
#: (head_dim, GQA ratio, QK-norm, window) of the model-feature builds the tests and benchmarks use:
#: Qwen3-0.6B / 8B with QK-norm (and 0.6B with a window too), Mistral's and Llama-3.2-1B's window,
#: Qwen2-0.5B's shape with a window (GQA 7: the window tests' odd group).
FEATURE_SHAPES = ((128, 2, True, False), (128, 4, True, False), (128, 2, True, True), (128, 4, False, True),
                  (64, 4, False, True), (64, 7, False, True))
DTYPES = (torch.bfloat16, torch.float16)
BATCHES = (1, 16)  # one build per batch tile count (NT 1: <= 8 sequences, NT 2: <= 16)
#: (head_dim, GQA ratio, QK-norm, window) of the persistent decode step's tests
#: (tests/gpu/test_persistent_step.py): SmolLM2, Llama-3.2-1B (also with a window), Llama-3-8B,
#: Qwen2-0.5B (bias), Qwen3-0.6B (QK-norm, also with a window).
STEP_SHAPES = ((64, 3, False, False), (64, 4, False, False), (128, 4, False, False), (64, 7, False, False),
               (128, 2, True, False), (128, 2, True, True), (64, 4, False, True))
#: (head_dim, GQA ratio, batch) of the step's timeline builds (bf16): its test (SmolLM2's shape) and
#: bench.step_timeline in tools/gpu_run.sh (Llama-3-8B batch 1 and 16, Llama-3.2-1B).
STEP_TIMELINE_SHAPES = ((64, 3, 1), (128, 4, 1), (128, 4, 16), (64, 4, 1))


def suite_specs() -> list[BuildSpec]:
    """Both block sizes of every (dtype, shape, batch tile) and feature build above, the FFN, the MLA
    block (every cluster size), the MoE block (per dtype and batch tile), the persistent decode step
    (STEP_SHAPES, and its timeline builds) and the primitives."""
    specs = [s for d in DTYPES for hd, g in SHAPES for b in BATCHES for s in attention_block.build_specs(d, hd, g, b)]
    specs += [s for d in DTYPES for hd, g, qk, w in FEATURE_SHAPES for b in BATCHES
              for s in attention_block.build_specs(d, hd, g, b, qk_norm=qk, window=w)]
    mla = [s for d in DTYPES for b in BATCHES for s in mla_block.build_specs(d, b)]
    moe = [moe_block.build_spec(d, b) for d in DTYPES for b in BATCHES]
    step = [decode_step.build_spec(d, hd, g, b, qk_norm=qk, window=w) for d in DTYPES for hd, g, qk, w in STEP_SHAPES
            for b in BATCHES]
    step += [decode_step.build_spec(torch.bfloat16, hd, g, b, timeline=True) for hd, g, b in STEP_TIMELINE_SHAPES]
    return unique_specs([*specs, ffn_block.build_spec(), *mla, *moe, *step, *all_library_specs()])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="kernel cache folder (default: CLUSTERFUSE_CACHE_DIR)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: CPU count)")
    args = parser.parse_args(argv)
    if args.cache is not None:
        os.environ["CLUSTERFUSE_CACHE_DIR"] = str(args.cache.resolve())
    specs = suite_specs()
    t = time.time()
    paths = prebuild(specs, jobs=args.jobs)
    print(f"built {len(paths)} libraries in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
