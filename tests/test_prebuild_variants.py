"""scripts/prebuild_variants.py: which libraries an A/B of compile-time switches builds (no GPU, no nvcc)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import prebuild_variants  # noqa: E402


def test_kernels_filter_the_libraries_and_the_variant_reaches_their_defines():
    variant = "CF_ATTN_NORM_STAGED=0"
    both = prebuild_variants.variant_specs(["llama-2-7b"], [1], torch.bfloat16, variant)
    attention = prebuild_variants.variant_specs(["llama-2-7b"], [1], torch.bfloat16, variant, ["attention"])
    ffn = prebuild_variants.variant_specs(["llama-2-7b"], [1], torch.bfloat16, variant, ["ffn"])
    assert {s[0] for s in both} == {"attention_block", "ffn_block"}
    assert attention and {s[0] for s in attention} == {"attention_block"}
    assert [s[0] for s in ffn] == ["ffn_block"]
    assert len(attention) + len(ffn) == len(both)
    assert all(s[2]["CF_ATTN_NORM_STAGED"] == 0 for s in both)
    assert all(s[2]["CF_ATTN_HEAD_DIM"] == 128 and s[2]["CF_ATTN_GQA"] == 1 for s in attention)


def test_an_unknown_kernel_is_refused_before_building(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prebuild_variants.main(["--kernels", "attention,mlp", "--cache", str(tmp_path)])
    assert exc.value.code == 2
    assert "--kernels: unknown mlp" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
