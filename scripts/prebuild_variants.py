"""Build the fused kernels of some models for several sets of extra defines, without a GPU.

    python scripts/prebuild_variants.py --models llama-2-7b,llama-3-8b \\
        --variants ";CF_ATTN_GEMV_DEPTH=3,CF_FFN_GEMV_DEPTH=2" --cache .kcache

Each variant's libraries land in ``--cache`` under the key the same process would compute at
run time with ``CLUSTERFUSE_EXTRA_DEFINES`` set to that variant (clusterfuse.ops.build), so a
device run that carries the folder and sets ``CLUSTERFUSE_CACHE_DIR`` to it builds nothing.
Variants as in bench/variants.py (``;`` between variants, ``,`` between defines; ``""``: defaults).
``--kernels attention`` (or ``ffn``) builds only that kernel's libraries: a switch of one kernel
gives the other's library a new cache key too, and a build nobody runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.variants import parse_variants  # noqa: E402
from clusterfuse.models.loader import load_config  # noqa: E402
from clusterfuse.ops import attention_block, ffn_block  # noqa: E402
from clusterfuse.ops.build import BuildSpec, prebuild, unique_specs  # noqa: E402
from clusterfuse.ops.prebuild import model_library_specs  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


_KERNELS = {"attention": attention_block.LIB_NAME, "ffn": ffn_block.LIB_NAME}  # --kernels names → library names


def variant_specs(models: Sequence[str], batches: Sequence[int], dtype: torch.dtype, variant: str,
                  kernels: Sequence[str] = tuple(_KERNELS)) -> list[BuildSpec]:
    """The libraries of these kernels that these models need, this variant's defines merged in
    (unique_specs reads them from ``CLUSTERFUSE_EXTRA_DEFINES``, set for the call only)."""
    os.environ["CLUSTERFUSE_EXTRA_DEFINES"] = variant
    libraries = {_KERNELS[k] for k in kernels}
    try:
        return unique_specs(s for m in models for s in model_library_specs(load_config(m), batches, dtype)
                            if s[0] in libraries)
    finally:
        del os.environ["CLUSTERFUSE_EXTRA_DEFINES"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-2-7b,llama-3-8b", help="comma-separated presets or model paths")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--variants", default="", help="';'-separated define sets, each 'NAME=value,...'")
    parser.add_argument("--kernels", default=",".join(_KERNELS),
                        help=f"comma-separated kernels to build ({', '.join(_KERNELS)}): an A/B of one kernel's "
                             "switch needs only its libraries")
    parser.add_argument("--cache", type=Path, required=True, help="kernel cache folder (CLUSTERFUSE_CACHE_DIR)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: CPU count)")
    args = parser.parse_args(argv)
    os.environ["CLUSTERFUSE_CACHE_DIR"] = str(args.cache.resolve())
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    kernels = [k for k in args.kernels.split(",") if k]
    if unknown := sorted(set(kernels) - set(_KERNELS)):
        parser.error(f"--kernels: unknown {', '.join(unknown)} (expected some of {', '.join(_KERNELS)})")
    specs = unique_specs(s for v in parse_variants(args.variants)
                         for s in variant_specs(models, batches, _DTYPES[args.dtype], v, kernels))
    print(f"building {len(specs)} libraries into {args.cache}", flush=True)
    for path in prebuild(specs, jobs=args.jobs):
        print(path)


if __name__ == "__main__":
    main()
