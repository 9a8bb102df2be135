"""The kernels' C ABI structs (kernels/include/clusterfuse/abi/*.h) and their ctypes mirrors
(clusterfuse/ops/kernel_abi.py) agree: same fields in the same order, every offset and size equal,
as a C compiler lays the headers out (CPU only: a host compiler, no GPU)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from clusterfuse.ops import build, kernel_abi

ABI_DIR = build.INCLUDE_DIR / "clusterfuse" / "abi"
HEADERS = ("attention_block.h", "ffn_block.h", "mla_block.h", "moe_block.h", "decode_step.h")


def _c_fields(header_text: str, struct: str) -> list[str]:
    """Field names of ``typedef struct NAME { ... } NAME;`` in declaration order."""
    body = re.search(r"typedef struct " + struct + r" \{(.*?)\} " + struct + ";", header_text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    names: list[str] = []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        decl = re.sub(r"\[[^\]]*\]", "", decl)  # arrays: the name before the brackets
        head, *rest = decl.split(",")
        names.append(re.split(r"[\s*]+", head.strip())[-1])
        names += [r.strip().lstrip("*").strip() for r in rest]
    return names


def test_mirrors_name_the_headers_fields_in_order():
    text = "".join((ABI_DIR / h).read_text() for h in HEADERS)
    for c_name, mirror in kernel_abi.STRUCTS.items():
        assert [f[0] for f in mirror._fields_] == _c_fields(text, c_name), c_name


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_offsets_and_sizes_match_the_c_compiler(tmp_path):
    lines = ["#include <stddef.h>", "#include <stdio.h>", *(f'#include "clusterfuse/abi/{h}"' for h in HEADERS),
             "int main(void) {"]
    want = []
    for c_name, mirror in kernel_abi.STRUCTS.items():
        lines.append(f'  printf("%zu\\n", sizeof({c_name}));')
        want.append(ctypes.sizeof(mirror))
        for name, _ in mirror._fields_:
            lines.append(f'  printf("%zu\\n", offsetof({c_name}, {name}));')
            want.append(getattr(mirror, name).offset)
    lines += ["  return 0;", "}"]
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["cc", "-std=c11", f"-I{build.INCLUDE_DIR}", str(src), "-o", str(tmp_path / "abi")], check=True)
    got = [int(v) for v in subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == want


def test_launch_structs_take_keywords():
    args = kernel_abi.FfnBlockArgs(shape=kernel_abi.FfnBlockShape(0, 2, 4096, 11008, 8, 1), x=16, launch_mode=2,
                                   eps=1e-5)
    got = (args.shape.batch, args.shape.intermediate, args.x, args.residual, args.launch_mode)
    assert got == (2, 11008, 16, None, 2)
    plan = kernel_abi.AttentionBlockPlan()
    plan.ksplit_qkv[15] = 3
    assert list(plan.ksplit_qkv)[-1] == 3 and len(plan.ksplit_qkv) == kernel_abi.ATTENTION_BLOCK_MAX_CLUSTER


@pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")
def test_entry_points_read_the_structs_on_a_cpu_machine(tmp_path, monkeypatch):
    """Built and loaded without a GPU: the spec comes back through the struct, and a launch with an
    out-of-range option is refused (kErrArgs) before any CUDA call, for both libraries."""
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(tmp_path))
    from clusterfuse.ops import attention_block, ffn_block

    attn = kernel_abi.bind_attention_block(build.load_library(
        attention_block.LIB_NAME, attention_block.LIB_SOURCES, attention_block._defines(0, 128, 4, 2)))
    spec = kernel_abi.AttentionBlockSpec()
    attn.cf_attention_block_spec(ctypes.byref(spec))
    assert (spec.dtype, spec.head_dim, spec.gqa, spec.max_batch, spec.timeline_slots, spec.threads, spec.qk_norm,
            spec.window) == (0, 128, 4, 16, 0, 128, 0, 0)
    args = kernel_abi.AttentionBlockArgs(shape=kernel_abi.AttentionBlockShape(1, 4096, 32, 8, 4, 1), launch_mode=3)
    rc = attn.cf_attention_block_launch(ctypes.byref(args), ctypes.byref(kernel_abi.AttentionBlockPlan()), None)
    assert rc == -1 and b"unsupported" in attn.cf_attention_block_error(rc)
    # A model feature this build does not do is refused, never ignored: QK-norm weights, a window.
    for feature in (dict(q_norm_w=16, k_norm_w=16), dict(window=4096), dict(window=-1)):
        args = kernel_abi.AttentionBlockArgs(shape=kernel_abi.AttentionBlockShape(1, 4096, 32, 8, 4, 1), **feature)
        rc = attn.cf_attention_block_launch(ctypes.byref(args), ctypes.byref(kernel_abi.AttentionBlockPlan()), None)
        assert rc == -1, feature
    ffn = kernel_abi.bind_ffn_block(build.load_library(*ffn_block.build_spec()))
    fargs = kernel_abi.FfnBlockArgs(shape=kernel_abi.FfnBlockShape(0, 1, 4096, 11008, 8, 1), launch_mode=-1)
    rc = ffn.cf_ffn_block_launch(ctypes.byref(fargs), ctypes.byref(kernel_abi.FfnBlockPlan()), None)
    assert rc == -1 and b"unsupported" in ffn.cf_ffn_block_error(rc)


@pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")
def test_moe_entry_points_refuse_bad_arguments_on_a_cpu_machine(tmp_path, monkeypatch):
    """The MoE library builds and loads without a GPU, and its plan and launch refuse what the
    build cannot run (another dtype or batch tile: kErrBuild) or bad routing settings (kErrArgs)
    before any CUDA call."""
    import torch

    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(tmp_path))
    from clusterfuse.ops import moe_block

    lib = kernel_abi.bind_moe_block(build.load_library(*moe_block.build_spec(torch.bfloat16, 1)))
    lite = kernel_abi.MoeBlockShape(0, 1, 2048, 1408, 2816, 64, 6, 8)
    for shape, code in ((kernel_abi.MoeBlockShape(1, 1, 2048, 1408, 2816, 64, 6, 8), -4),   # fp16: not this build
                        (kernel_abi.MoeBlockShape(0, 9, 2048, 1408, 2816, 64, 6, 8), -4),   # batch 9: NT 2
                        (kernel_abi.MoeBlockShape(0, 1, 2048, 1408, 2816, 300, 6, 8), -1),  # too many experts
                        (kernel_abi.MoeBlockShape(0, 1, 2048, 1408, 2816, 64, 6, 3), -1)):  # cluster 3
        rc = lib.cf_moe_block_plan(ctypes.byref(shape), ctypes.byref(kernel_abi.MoeBlockPlan()))
        assert rc == code, (list(shape._fields_), rc)
    bad = (dict(n_group=3, topk_group=1),                     # 3 does not divide 64
           dict(n_group=8, topk_group=9), dict(launch_mode=3),
           dict(w_shared_gate_up=16))                         # shared width given but one pointer missing
    for change in bad:
        args = kernel_abi.MoeBlockArgs(shape=lite, **change)
        rc = lib.cf_moe_block_launch(ctypes.byref(args), ctypes.byref(kernel_abi.MoeBlockPlan()), None)
        assert rc == -1 and b"unsupported" in lib.cf_moe_block_error(rc), change
