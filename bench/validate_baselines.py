"""Measure the ceilings and the PyTorch baselines on a GPU and compare them with DESIGN.md.

Run on the GPU machine from the repository root::

    python -m bench.validate_baselines            # writes $OUT/bench/results/baselines.json
    python -m bench.validate_baselines --quick    # fewer configurations

Records go to ``--out`` (default ``$OUT/bench/results`` where ``$OUT`` is set, else
``bench/results``); each carries ``anchor_us``, DESIGN.md's number for the same
configuration where there is one.  The last thing printed is a comparison table.
"""

from __future__ import annotations

import argparse
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.baselines.gpt_fast_decode import build, time_decode_step
from bench.baselines.torch_blocks import TorchAttentionBlock, TorchFFNBlock
from bench.common import (
    RecordWriter,
    attention_block_bytes,
    decode_step_bytes,
    dtype_name,
    ffn_block_bytes,
    floor_us,
    load_records,
    measure_copy_bandwidth,
    measure_gemv_bandwidth,
    results_dir,
    rotating_copies,
    time_cuda_graph,
)
from clusterfuse.models.presets import preset

#: DESIGN.md's H100 measurements, µs: (bench, model, batch, seq_len) -> time of the torch baseline.
DESIGN_ANCHORS: dict[tuple[str, str, int, int | None], float] = {
    ("attention_block", "llama-2-7b", 1, 1024): 114.0,
    ("attention_block", "llama-2-7b", 1, 4096): 130.1,
    ("attention_block", "llama-2-7b", 1, 16384): 197.2,
    ("ffn_block", "llama-2-7b", 1, None): 126.9,
    ("ffn_block", "llama-2-7b", 4, None): 132.9,
    ("ffn_block", "llama-2-7b", 16, None): 137.5,
    ("ffn_block", "llama-3-8b", 1, None): 149.6,
    ("ffn_block", "llama-3-8b", 4, None): 160.3,
    ("ffn_block", "llama-3-8b", 16, None): 164.6,
    ("ffn_block", "smollm2-135m", 1, None): 30.5,
    ("ffn_block", "smollm2-135m", 4, None): 33.7,
    ("ffn_block", "smollm2-135m", 16, None): 34.7,
    ("decode_step", "llama-2-7b", 1, 1024): 7606.3,
    ("decode_step", "llama-2-7b", 1, 8192): 8900.7,
    ("decode_step", "llama-3-8b", 1, 1024): 8010.9,
    ("decode_step", "llama-3-8b", 1, 8192): 8294.6,
}


def _free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _guarded(name: str, run: Callable[[], None]) -> None:
    """Run one section; a failure is printed and the other sections still run."""
    try:
        run()
    except Exception:  # noqa: BLE001  (report and go on: one broken config must not lose the rest)
        print(f"!! {name} failed:\n{traceback.format_exc()}", flush=True)
    finally:
        _free()


def attention_blocks(writer: RecordWriter, bw: float, model: str, seq_lens: Sequence[int | list[int]],
                     batch: int = 1, dtype: torch.dtype = torch.float16) -> None:
    """Attention block, one record per entry of ``seq_lens``: one length for all ``batch``
    sequences, or a list of per-sequence lengths (the masked SDPA path)."""
    cfg = preset(model)
    for s in seq_lens:
        lens = [s] * batch if isinstance(s, int) else s
        nbytes = attention_block_bytes(cfg, batch, lens, 2)

        def make(lens: list[int] = lens) -> tuple[TorchAttentionBlock, torch.Tensor]:
            block = TorchAttentionBlock(cfg, batch, max(lens) + 1, dtype=dtype, device="cuda",
                                        seed=torch.randint(1 << 30, ()).item())
            block.positions.set(lens)
            return block, torch.randn(batch, cfg.hidden_size, device="cuda", dtype=dtype)

        sets = rotating_copies(make, nbytes.total)
        t = time_cuda_graph([lambda b=b, x=x: b(x) for b, x in sets])
        seq = lens[0] if len(set(lens)) == 1 else None
        writer.append(bench="attention_block", model=model, batch=batch, seq_len=seq, dtype=dtype_name(dtype),
                      variant="torch_cuda_graph", timing=t, floor_us=floor_us(nbytes, bw), bandwidth_GBs=bw,
                      seq_lens=lens, bytes=nbytes.as_dict(), rotation=len(sets),
                      anchor_us=DESIGN_ANCHORS.get(("attention_block", model, batch, seq)))
        del sets
        _free()


def ffn_blocks(writer: RecordWriter, bw: float, model: str, batches: Sequence[int],
               dtype: torch.dtype = torch.bfloat16) -> None:
    cfg = preset(model)
    for batch in batches:
        nbytes = ffn_block_bytes(cfg, batch, 2)

        def make(batch: int = batch) -> tuple[TorchFFNBlock, torch.Tensor]:
            block = TorchFFNBlock(cfg, dtype=dtype, device="cuda", seed=torch.randint(1 << 30, ()).item())
            return block, torch.randn(batch, cfg.hidden_size, device="cuda", dtype=dtype)

        sets = rotating_copies(make, nbytes.total)
        t = time_cuda_graph([lambda b=b, x=x: b(x) for b, x in sets])
        writer.append(bench="ffn_block", model=model, batch=batch, seq_len=None, dtype=dtype_name(dtype),
                      variant="torch_cuda_graph", timing=t, floor_us=floor_us(nbytes, bw), bandwidth_GBs=bw,
                      bytes=nbytes.as_dict(), rotation=len(sets),
                      anchor_us=DESIGN_ANCHORS.get(("ffn_block", model, batch, None)))
        del sets
        _free()


def decode_steps(writer: RecordWriter, bw: float, model: str, seq_lens: Sequence[int], batch: int = 1,
                 dtype: torch.dtype = torch.float16) -> None:
    cfg = preset(model)
    decoder = build(cfg, batch, max(seq_lens) + 1, dtype=dtype, device="cuda")
    for s in seq_lens:
        nbytes = decode_step_bytes(cfg, batch, s, 2)
        t = time_decode_step(decoder, s)
        writer.append(bench="decode_step", model=model, batch=batch, seq_len=s, dtype=dtype_name(dtype),
                      variant="torch_cuda_graph", timing=t, floor_us=floor_us(nbytes, bw), bandwidth_GBs=bw,
                      bytes=nbytes.as_dict(), ms_per_token=t.median_us / 1e3,
                      anchor_us=DESIGN_ANCHORS.get(("decode_step", model, batch, s)))


def print_table(records: list[dict]) -> None:
    print("\nbench            model         batch  seq    dtype  time_us   [min..max]          anchor_us"
          "  floor_us  floor/time")
    for r in records:
        if r["bench"] == "primitives":
            print(f"{r['variant']:16s} {r['bandwidth_GBs']:.1f} GB/s")
            continue
        anchor = f"{r['anchor_us']:9.1f}" if r.get("anchor_us") else "        -"
        seq = r["seq_len"] if r["seq_len"] is not None else "-"
        print(f"{r['bench']:16s} {r['model']:13s} {r['batch']:5d}  {seq!s:6s} {r['dtype']:5s} {r['time_us']:9.1f} "
              f"[{r['time_us_min']:8.1f}..{r['time_us_max']:8.1f}]  {anchor}  {r['floor_us']:8.1f}  "
              f"{r['floor_us'] / r['time_us']:6.1%}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for baselines.json")
    parser.add_argument("--quick", action="store_true", help="only DESIGN's first row of each table")
    args = parser.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) / "bench" / "results" if os.environ.get("OUT") else results_dir())
    if not torch.cuda.is_available():
        raise SystemExit("validate_baselines needs a CUDA GPU")
    torch.manual_seed(0)
    writer = RecordWriter(out / "baselines.json")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, writing {writer.path}", flush=True)

    gemv_bw = measure_gemv_bandwidth()
    copy_bw = measure_copy_bandwidth()
    for variant, bw in (("cublas_gemv", gemv_bw), ("d2d_copy", copy_bw)):
        # time_us: reading 1 GiB at that bandwidth, so that the record has the required field.
        writer.append(bench="primitives", variant=variant, time_us=2**30 / bw / 1e3, bandwidth_GBs=bw,
                      bytes=2**30, dtype="fp16")
    print(f"GEMV {gemv_bw:.1f} GB/s (DESIGN: 2890), copy {copy_bw:.1f} GB/s (DESIGN: 3023)", flush=True)

    quick = args.quick
    attn_s = [1024] if quick else [1024, 4096, 16384]
    sections: list[tuple[str, Callable[[], None]]] = [
        ("attention llama-2-7b", lambda: attention_blocks(writer, gemv_bw, "llama-2-7b", attn_s)),
        ("ffn llama-2-7b", lambda: ffn_blocks(writer, gemv_bw, "llama-2-7b", [1] if quick else [1, 4, 16])),
        ("decode llama-2-7b", lambda: decode_steps(writer, gemv_bw, "llama-2-7b", [1024] if quick else [1024, 8192])),
    ]
    if not quick:
        sections += [
            ("attention llama-3-8b", lambda: attention_blocks(writer, gemv_bw, "llama-3-8b", attn_s)),
            ("attention llama-3-8b ragged", lambda: attention_blocks(
                writer, gemv_bw, "llama-3-8b", [[4096, 1024, 2048, 3000]], batch=4)),
            ("ffn llama-3-8b", lambda: ffn_blocks(writer, gemv_bw, "llama-3-8b", [1, 4, 16])),
            ("ffn smollm2-135m", lambda: ffn_blocks(writer, gemv_bw, "smollm2-135m", [1, 4, 16])),
            ("decode llama-3-8b", lambda: decode_steps(writer, gemv_bw, "llama-3-8b", [1024, 8192])),
        ]
    for name, run in sections:
        print(f"-- {name}", flush=True)
        _guarded(name, run)
    print_table(load_records([writer.path]))


if __name__ == "__main__":
    main()
