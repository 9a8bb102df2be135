"""Seeded random weights for presets: benchmarks and tests without downloading a checkpoint.

Why not 0.02 everywhere (the usual training init): the kernels and the engine run these
weights through many layers in bf16, and we want activations that look like a real model's,
O(1) at every layer of any width, so that errors show up as in real use and nothing
overflows.  Hence a fan-in scaled init:

* projections *into* a block (q/k/v, gate/up, MLA's down/up projections, the router):
  std ``1/sqrt(fan_in)``, so a normalised input gives O(1) outputs;
* projections *back into the residual stream* (``o_proj``, ``down_proj``): std
  ``1/sqrt(fan_in * 2 * num_layers)``, so 2·L residual additions sum to O(1);
* embeddings and ``lm_head``: std ``1/sqrt(hidden)`` so (tied or not) logits are O(1);
* norm weights 1.0 plus small noise (0.02) and biases 0.02, so that a kernel that forgets
  to apply them is caught by a test.

Every tensor is created on the target device and filled in place from one
``torch.Generator`` on that device, in the stable order of ``expected_shapes``: the
same ``(config, device, dtype, seed)`` gives the same weights, and a 7B preset is ready in
well under a second on a GPU.  (CPU and CUDA generators differ, so weights made on a
CPU and on a GPU with the same seed are not the same.)
"""

from __future__ import annotations

import math

import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.models.weights import expected_shapes

_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight")


def _std(name: str, shape: tuple[int, ...], config: ModelConfig) -> float:
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 1.0 / math.sqrt(config.hidden_size)
    if name.endswith(".bias"):
        return 0.02
    fan_in = shape[1]
    if name.endswith(_OUTPUT_PROJECTIONS):
        return 1.0 / math.sqrt(fan_in * 2 * config.num_hidden_layers)
    return 1.0 / math.sqrt(fan_in)


def random_weights(config: ModelConfig, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected_shapes(config)``, seeded, created directly on ``device`` in ``dtype``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if len(shape) == 1 and name.endswith("norm.weight"):
            t.normal_(1.0, 0.02, generator=gen)
        else:
            t.normal_(0.0, _std(name, shape, config), generator=gen)
        weights[name] = t
    return weights
