"""Reproducer of the flat exchange's race under programmatic launches (the reason the flat
exchange is neither tuned nor launched programmatically: `clusterfuse.ops.attention_block.FLAT_RACE`).

    python -m bench.flat_pdl_race [--model llama-3-8b] [--layers 4] [--modes 0,1,2] [--repeats 3]
                                  [--cluster 16] [--threads 256] [--out flat_pdl_race.json]

For each programmatic mode (`KernelOptions.programmatic_launch`, flat launches programmatic too)
and "guarded" (the defaults: flat launches in order), the fused engine's attention is pinned to the
flat exchange at one cluster and block size (`KernelOptions.attention_launch`; a fresh tuner, in a
temporary folder, picks only the FFN) and the decode is compared, teacher-forced, with the
reference backend ``--repeats`` times on the same stream. A correct configuration gives the same
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
from clusterfuse.ops.options import PROGRAMMATIC_LAUNCH_MODES, KernelOptions
from clusterfuse.ops.tuner import Tuner
from clusterfuse.reference import build_reference_model


def _valid_mode(mode: str) -> bool:
    return mode == "guarded" or (mode.isdigit() and int(mode) in PROGRAMMATIC_LAUNCH_MODES)


def mode_options(mode: str, cluster: int, threads: int) -> KernelOptions:
    """The options of one mode: the attention pinned to flat, its launches as the mode says."""
    pin = (cluster, "flat", threads)
    if mode == "guarded":
        return KernelOptions(attention_launch=pin)
    return KernelOptions(programmatic_launch=int(mode), flat_ordered_launch=False, attention_launch=pin)


def run_mode(mode: str, config, weights, *, cluster: int, threads: int, repeats: int, steps: int) -> dict:
    """One mode's record: per-repeat worst errors and whether all repeats were bit-identical."""
    options = mode_options(mode, cluster, threads)
    saved = attn_op.TUNER, ffn_op.TUNER
    with tempfile.TemporaryDirectory() as tmp:
        # Fresh tuners: this run's FFN choice, not one cached by another run.
        attn_op.TUNER, ffn_op.TUNER = Tuner(Path(tmp) / "attention.json"), Tuner(Path(tmp) / "ffn.json")
        try:
            fused = FusedModel(config, weights, device="cuda", kernel_options=options)
            reference = build_reference_model(config, weights, device="cuda")
            runs = [teacher_forced(fused, reference, config.vocab_size, steps=steps) for _ in range(repeats)]
        finally:
            attn_op.TUNER, ffn_op.TUNER = saved
        ffn_file = Path(tmp) / "ffn.json"  # the tuner's file: key -> {"choice", "times_us"}
        ffn_choices = [e["choice"] for e in json.loads(ffn_file.read_text()).values()] if ffn_file.exists() else []
    return {"mode": mode, "programmatic_launch": options.programmatic_launch,
            "flat_ordered": options.flat_ordered_launch,
            "attention": [cluster, "flat", threads], "ffn": ffn_choices,
            "worst": [r.worst for r in runs], "agreement": [r.agreement for r in runs],
            "worst_step": [r.errors.index(r.worst) for r in runs],
            "repeats_identical": all(r.errors == runs[0].errors for r in runs)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", default="0,1,2,guarded",
                        help="programmatic modes (0-3) and/or 'guarded'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--cluster", type=int, default=16)
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="JSON: environment and one record per mode")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    for m in modes:
        if not _valid_mode(m):
            raise SystemExit(f"--modes: expected 'guarded' or one of {PROGRAMMATIC_LAUNCH_MODES}, got {m!r}")
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
