"""The persistent decode step without a GPU: its library builds and refuses what it cannot run
before any CUDA call, and the op and the engine option reject bad arguments with one clear line
(tests/gpu/test_persistent_step.py runs it on a GPU)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from clusterfuse.ops import build, kernel_abi
from clusterfuse.ops import decode_step as step_op


def _plans(cluster: int, nc: int, inter: int) -> tuple[kernel_abi.AttentionBlockPlan, kernel_abi.FfnBlockPlan]:
    attn = kernel_abi.AttentionBlockPlan(smem_bytes=0, k_chunk=640, ksplit_o=1, coresident=1, active_clusters=1,
                                         partial_floats=0)
    for r in range(cluster):
        attn.ksplit_qkv[r] = 1
    lmax = 8 * (-(-(inter // 8) // nc))
    return attn, kernel_abi.FfnBlockPlan(num_clusters=nc, smem_bytes=0, lmax=lmax, ksplit1=1, ksplit2=1)


@pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")
def test_library_refuses_bad_shapes_plans_and_arguments_before_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(tmp_path))
    lib = kernel_abi.bind_decode_step(build.load_library(*step_op.build_spec(torch.bfloat16, 64, 3, 1)))
    spec = kernel_abi.DecodeStepSpec()
    lib.cf_decode_step_spec(ctypes.byref(spec))
    assert (spec.dtype, spec.head_dim, spec.gqa, spec.max_batch, spec.threads, spec.qk_norm, spec.window) == \
        (0, 64, 3, 8, 256, 0, 0)
    attn, ffn = _plans(4, 33, 1536)

    def plan_rc(**change) -> int:
        fields = dict(batch=1, hidden=576, heads=9, kv_heads=3, intermediate=1536, layers=2, cluster=4,
                      max_clusters=-1, attention=attn, ffn=ffn) | change
        shape = kernel_abi.DecodeStepShape(**fields)
        return lib.cf_decode_step_plan(ctypes.byref(shape), ctypes.byref(kernel_abi.DecodeStepPlan()))

    for change in (dict(cluster=3), dict(batch=9), dict(heads=12), dict(layers=0), dict(max_clusters=-2),
                   dict(hidden=584), dict(intermediate=1540)):
        assert plan_rc(**change) == -1, change
    bad_ffn = kernel_abi.FfnBlockPlan(num_clusters=33, smem_bytes=0, lmax=8, ksplit1=1, ksplit2=1)  # lmax != slices'
    bad_attn = kernel_abi.AttentionBlockPlan(k_chunk=100, ksplit_o=1)
    for change in (dict(ffn=bad_ffn), dict(attention=bad_attn)):
        rc = plan_rc(**change)
        assert rc == -4 and b"per-block plans" in lib.cf_decode_step_error(rc), change
    args = kernel_abi.DecodeStepArgs(shape=kernel_abi.DecodeStepShape(1, 576, 9, 3, 1536, 2, 4, -1, attn, ffn),
                                     window=64)  # no pointers, and a window this build does not do
    plan = kernel_abi.DecodeStepPlan(smem_bytes=1024, clusters=1, active_clusters=1, partial_floats=1)
    rc = lib.cf_decode_step_launch(ctypes.byref(args), ctypes.byref(plan), None)
    assert rc == -1 and b"unsupported" in lib.cf_decode_step_error(rc)


def test_op_rejects_bad_arguments_with_their_names():
    t = torch.zeros(4, dtype=torch.bfloat16)
    layer = step_op.StepLayer(t, t, None, t, None, None, t, t, t, t, t)
    with pytest.raises(ValueError, match="layers"):
        step_op.decode_step(torch.zeros(1, 576, dtype=torch.bfloat16), [], t, t, t, t, num_heads=9, num_kv_heads=3,
                            head_dim=64, eps=1e-5, cluster_size=4)
    with pytest.raises(ValueError, match="cluster_size"):
        step_op.decode_step(torch.zeros(1, 576, dtype=torch.bfloat16), [layer], t, t, t, t, num_heads=9,
                            num_kv_heads=3, head_dim=64, eps=1e-5, cluster_size=3)
    with pytest.raises(ValueError, match=r"layers\[0\]: hidden"):  # on the CPU: not a CUDA tensor
        step_op.decode_step(torch.zeros(1, 576, dtype=torch.bfloat16), [layer], t, t, t, t, num_heads=9,
                            num_kv_heads=3, head_dim=64, eps=1e-5, cluster_size=4)
    with pytest.raises(ValueError, match="options"):
        step_op.decode_step(torch.zeros(1, 576, dtype=torch.bfloat16), [layer], t, t, t, t, num_heads=9,
                            num_kv_heads=3, head_dim=64, eps=1e-5, cluster_size=4, options={})
    cpu = torch.device("cpu")
    for kw, name in ((dict(cluster_size=3), "cluster_size"), (dict(max_clusters=-1), "max_clusters"),
                     (dict(num_layers=0), "layers")):
        args = dict(dtype=torch.bfloat16, batch=1, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64,
                    intermediate=1536, num_layers=2, cluster_size=4, device=cpu) | kw
        with pytest.raises(ValueError, match=name):
            step_op.plan(**args)
    with pytest.raises(ValueError, match="head_dim"):
        step_op.plan(torch.bfloat16, 1, 576, 9, 3, 96, 1536, 2, 4, device=cpu)


def test_fused_model_step_option_is_checked_first():
    from clusterfuse.engine.fused_model import FusedModel
    from clusterfuse.models.presets import preset

    config = preset("smollm2-135m")
    for kw, name in ((dict(step="mega"), "step"), (dict(step="persistent", step_cluster=3), "step_cluster"),
                     (dict(step="persistent", step_max_clusters=-1), "step_max_clusters")):
        with pytest.raises(ValueError, match=name):
            FusedModel(config, {}, device="cpu", **kw)
