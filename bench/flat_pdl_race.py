"""Reproducer of the flat exchange's race under programmatic launches (the reason for
`clusterfuse.ops.attention_block.FLAT_ORDERED_LAUNCH`).

    python -m bench.flat_pdl_race [--model llama-3-8b] [--layers 4] [--modes 0,1,2] [--repeats 3]
                                  [--cluster 16] [--threads 256] [--out flat_pdl_race.json]

For each programmatic mode (clusterfuse.ops.launch.PROGRAMMATIC_LAUNCH), the guarded launch
("guarded": the library's default, flat launches in order) and modes with ordered FFN launches
("1-ffn-ordered", "2-ffn-ordered": only the attention launches early, after the FFN before it
has finished; that isolates the attention's early start), the fused engine's attention is
pinned to the flat exchange at one cluster and block size (a fresh tuner, in a temporary
folder, picks only the FFN) and the decode is compared, teacher-forced, with the reference
backend ``--repeats`` times on the same stream. A correct configuration gives the same
per-step errors on every repeat and a worst error near the other exchanges' (~9e-3 for
Llama-3-8B, 4 layers). Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import environment
from clusterfuse.engine.fused_model import FusedModel
from clusterfuse.engine.parity import teacher_forced
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights
from clusterfuse.ops import attention_block as attn_op
from clusterfuse.ops import ffn_block as ffn_op
from clusterfuse.ops import launch
from clusterfuse.ops.tuner import Tuner
from clusterfuse.reference import build_reference_model

DEFAULT_PROGRAMMATIC_LAUNCH = launch.PROGRAMMATIC_LAUNCH  # the library's default mode

FFN_ORDERED = "-ffn-ordered"  # mode suffix: the FFN launches in order, the attention as the mode says


def _valid_mode(mode: str) -> bool:
    base = mode.removesuffix(FFN_ORDERED)
    return mode == "guarded" or (base.isdigit() and int(base) in launch.PROGRAMMATIC_LAUNCH_MODES)


def run_mode(mode: str, config, weights, *, cluster: int, threads: int, repeats: int, steps: int) -> dict:
    """One mode's record: per-repeat worst errors and whether all repeats were bit-identical."""
    guarded, ffn_ordered = mode == "guarded", mode.endswith(FFN_ORDERED)
    launch.PROGRAMMATIC_LAUNCH = DEFAULT_PROGRAMMATIC_LAUNCH if guarded else int(mode.removesuffix(FFN_ORDERED))
    attn_op.FLAT_ORDERED_LAUNCH = guarded
    # ffn_block's own name for launch.programmatic_launch: 0 makes its launches ordered.
    ffn_op.programmatic_launch = (lambda kernel: 0) if ffn_ordered else launch.programmatic_launch
    attn_op.TUNED_EXCHANGES, attn_op.BLOCK_THREADS, attn_op.CLUSTER_SIZES = ("flat",), (threads,), (cluster,)
    with tempfile.TemporaryDirectory() as tmp:
        attn_op.TUNER = Tuner(Path(tmp) / "attention.json")
        ffn_op.TUNER = Tuner(Path(tmp) / "ffn.json")
        fused = FusedModel(config, weights, device="cuda")
        reference = build_reference_model(config, weights, device="cuda")
        runs = [teacher_forced(fused, reference, config.vocab_size, steps=steps) for _ in range(repeats)]
        ffn_file = Path(tmp) / "ffn.json"  # the tuner's file: key -> {"choice", "times_us"}
        ffn_choices = [e["choice"] for e in json.loads(ffn_file.read_text()).values()] if ffn_file.exists() else []
    return {"mode": mode, "programmatic_launch": launch.PROGRAMMATIC_LAUNCH, "flat_ordered": guarded,
            "ffn_ordered": ffn_ordered,
            "attention": [cluster, "flat", threads], "ffn": ffn_choices,
            "worst": [r.worst for r in runs], "agreement": [r.agreement for r in runs],
            "worst_step": [r.errors.index(r.worst) for r in runs],
            "repeats_identical": all(r.errors == runs[0].errors for r in runs)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", default="0,1,2,guarded",
                        help=f"programmatic modes (N or N{FFN_ORDERED}) and/or 'guarded'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--cluster", type=int, default=16)
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="JSON: environment and one record per mode")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    for m in modes:
        if not _valid_mode(m):
            raise SystemExit(f"--modes: expected 'guarded' or one of {launch.PROGRAMMATIC_LAUNCH_MODES}, "
                             f"optionally with {FFN_ORDERED}, got {m!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench.flat_pdl_race needs a CUDA GPU (Hopper)")
    config = preset(args.model).replace(num_hidden_layers=args.layers)
    weights = random_weights(config, device="cuda", dtype=torch.bfloat16, seed=5)
    records = []
    for m in modes:
        rec = run_mode(m, config, weights, cluster=args.cluster, threads=args.threads, repeats=args.repeats,
                       steps=args.steps)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
