"""bench.prefill's CPU-checkable parts: the plain PyTorch prefill baseline computes the model (so
the benchmark compares like with like), and the markdown table is made from the records."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from bench.baselines.torch_prefill import TorchPrefill
from bench.prefill import BASELINE, markdown
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference import build_reference_model
from tests.test_prefill import CONFIGS, rel_err


@pytest.mark.parametrize("name", ["gqa", "mha", "gqa4_llama3_rope", "qkv_bias_tied"])
def test_baseline_prefill_matches_the_reference(name: str) -> None:
    config = CONFIGS[name]
    ref = build_reference_model(config, random_weights(config, dtype=torch.float32, seed=3))
    ids = torch.randint(97, (40,), generator=torch.Generator().manual_seed(0))
    base = TorchPrefill(ref, 64, backends=(SDPBackend.MATH, SDPBackend.FLASH_ATTENTION))
    expected = ref.forward(ids[None], ref.new_cache(1, 64))[0, -1]
    assert rel_err(base(ids), expected) < 1e-5
    with pytest.raises(ValueError, match="capacity"):
        TorchPrefill(ref, 8)(ids)


def test_markdown_table_from_records() -> None:
    common = {"model": "llama-3-8b", "dtype": "bf16", "device": "NVIDIA H100 80GB HBM3", "torch": "2.x",
              "git_commit": "abc", "command": "python -m bench.prefill", "peak_memory_GiB": 21.0}
    records = [
        {**common, "seq_len": 1024, "variant": BASELINE, "time_us": 100_000.0, "tokens_per_s": 10240.0,
         "ttft_ms": 101.0},
        {**common, "seq_len": 1024, "variant": "clusterfuse", "time_us": 110_000.0, "tokens_per_s": 9309.0,
         "ttft_ms": 112.0},
    ]
    table = markdown(records)
    lines = table.splitlines()
    assert lines[4].startswith("| 1024 | clusterfuse | 110.0 | 9309 | 112.0 | 21.0 | 91% |")
    assert lines[5].startswith(f"| 1024 | {BASELINE} | 100.0 | 10240 | 101.0 | 21.0 | 100% |")
    assert "`python -m bench.prefill`" in table
