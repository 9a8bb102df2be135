"""Programmatic dependent launch (KernelOptions.programmatic_launch, kernels' pdl.cuh)
changes when the fused kernels start, never what they compute.

* The decode graph of a Llama-2-7B / Llama-3-8B-shaped model (3 layers, random weights): every
  step's logits are bit-identical in every launch mode (PROGRAMMATIC_LAUNCH_MODES), over 8
  teacher-forced steps that append to the cache (so each attention kernel reads rows the
  previous step wrote).
* Eager chains where the kernel just before a fused kernel rewrites its inputs and its weights
  in place (a torch copy): the fused kernel must see the new values (its pre-wait part may only
  prefetch weights, pdl.cuh).
"""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.fused_model import FusedModel
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights
from clusterfuse.ops import attention_block as attn_op
from clusterfuse.ops.ffn_block import ffn_block
from clusterfuse.ops.options import PROGRAMMATIC_LAUNCH_MODES, KernelOptions

pytestmark = pytest.mark.gpu

STEPS = 8


@pytest.fixture(autouse=True)
def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused kernels need a Hopper (sm_90) GPU")


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b"])
def test_decode_graph_bit_identical_with_and_without_programmatic_launch(name):
    config = preset(name).replace(num_hidden_layers=3)
    weights = random_weights(config, device="cuda", dtype=torch.bfloat16, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(4)
    prompt = torch.randint(config.vocab_size, (2, 40), device="cuda", generator=gen)
    tokens = torch.randint(config.vocab_size, (STEPS, 2, 1), device="cuda", generator=gen)
    logits = {}
    for pdl in PROGRAMMATIC_LAUNCH_MODES:
        fused = FusedModel(config, weights, device="cuda", kernel_options=KernelOptions(programmatic_launch=pdl))
        cache = fused.new_cache(2, 128)
        fused.forward(prompt, cache, [0, 1])
        logits[pdl] = torch.stack([fused.forward(tokens[i], cache, [0, 1]) for i in range(STEPS)])
    assert torch.isfinite(logits[0]).all()
    for pdl in PROGRAMMATIC_LAUNCH_MODES[1:]:
        assert torch.equal(logits[pdl], logits[0]), pdl


def _attention_inputs(dtype: torch.dtype):
    """Llama-2-7B-shaped attention inputs: batch 2, contiguous cache of 256 rows, 100 / 7 cached."""
    h, nh, hd, cap = 4096, 32, 128, 256
    g = torch.Generator(device="cuda").manual_seed(7)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    pos = torch.arange(cap + 1, dtype=torch.float32, device="cuda")[:, None]
    ang = pos / 10000.0 ** (torch.arange(0, hd, 2, device="cuda") / hd)
    return dict(hidden=rnd(2, h), norm_weight=(1 + 0.1 * torch.randn(h, device="cuda", generator=g)).to(dtype),
                w_qkv=rnd(3 * nh * hd, h, scale=h**-0.5), b_qkv=None, w_o=rnd(h, nh * hd, scale=(nh * hd) ** -0.5),
                cos=ang.cos(), sin=ang.sin(), positions=torch.tensor([100, 7], device="cuda"),
                k_cache=rnd(2, nh, cap, hd), v_cache=rnd(2, nh, cap, hd),
                cache_lens=torch.tensor([100, 7], dtype=torch.int32, device="cuda"))


def _attention(inp: dict, residual: torch.Tensor, options: KernelOptions) -> torch.Tensor:
    args = dict(inp)
    k, v = args.pop("k_cache").clone(), args.pop("v_cache").clone()  # every call appends to fresh copies
    return attn_op.attention_block(
        args.pop("hidden"), args.pop("norm_weight"), args.pop("w_qkv"), args.pop("b_qkv"), args.pop("w_o"),
        args.pop("cos"), args.pop("sin"), args.pop("positions"), k, v, args.pop("cache_lens"),
        num_heads=32, num_kv_heads=32, head_dim=128, eps=1e-5, residual=residual, cluster_size=4, options=options)


def test_kernel_sees_inputs_and_weights_written_just_before_it():
    dtype = torch.bfloat16
    inp = _attention_inputs(dtype)
    new_w_qkv, new_w_o = inp["w_qkv"].flip(0).contiguous(), inp["w_o"].flip(1).contiguous()
    new_hidden = inp["hidden"].flip(1).contiguous()
    w_gu = (torch.randn(2 * 11008, 4096, device="cuda") * 4096**-0.5).to(dtype)
    w_down = (torch.randn(4096, 11008, device="cuda") * 11008**-0.5).to(dtype)
    new_w_down = w_down.flip(0).contiguous()
    outs = {}
    for pdl in PROGRAMMATIC_LAUNCH_MODES:
        opts = KernelOptions(programmatic_launch=pdl)
        run = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        first = _attention(run, residual=run["hidden"], options=opts)
        # Rewrite the next launch's activations and weights in place, right before it.
        run["hidden"].copy_(new_hidden)
        run["w_qkv"].copy_(new_w_qkv)
        run["w_o"].copy_(new_w_o)
        second = _attention(run, residual=run["hidden"], options=opts)
        down = w_down.clone()
        ffn_first = ffn_block(second, run["norm_weight"], w_gu, down, 1e-5, residual=second, cluster_size=4,
                              options=opts)
        down.copy_(new_w_down)
        ffn_second = ffn_block(ffn_first, run["norm_weight"], w_gu, down, 1e-5, residual=ffn_first, cluster_size=4,
                               options=opts)
        outs[pdl] = (first, second, ffn_first, ffn_second)
    torch.cuda.synchronize()
    # The rewritten launches computed with the new values: they equal launches on fresh copies of them.
    ordered = KernelOptions(programmatic_launch=0)
    fresh = dict(inp, hidden=new_hidden, w_qkv=new_w_qkv, w_o=new_w_o)
    assert torch.equal(_attention(fresh, residual=new_hidden, options=ordered), outs[0][1])
    expect = ffn_block(outs[0][2], inp["norm_weight"], w_gu, new_w_down, 1e-5, residual=outs[0][2], cluster_size=4,
                       options=ordered)
    assert torch.equal(expect, outs[0][3])
    for pdl in PROGRAMMATIC_LAUNCH_MODES[1:]:
        for a, b in zip(outs[pdl], outs[0], strict=True):
            assert torch.isfinite(a.float()).all()
            assert torch.equal(a, b), pdl
