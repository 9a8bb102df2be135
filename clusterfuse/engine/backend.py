"""Choosing where and how a model runs: device, dtype and backend.

* ``fused``: the fused Hopper kernels (decode) + the GPU prefill; needs a Hopper GPU (compute
  capability 9.0), nvcc to build the kernels, the Llama or DeepSeek-V2 family and a shape the
  kernels take (DeepSeek-V2: the MLA kernel is built for DeepSeek-V2-Lite's attention);
* ``torch``: bf16 PyTorch ops under CUDA graphs + the same GPU prefill, any CUDA GPU, Llama family
  only (DeepSeek-V2 has no torch decode step: ``auto`` goes fused → reference for it);
* ``reference``: the fp32-accumulating PyTorch reference, any device and every family.

``auto`` takes the first of these that can run and says once, in one log line, why it passed over
a faster one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.ops.build import find_nvcc

log = logging.getLogger("clusterfuse")

BACKENDS = ("auto", "fused", "torch", "reference")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Platform:
    """What this machine offers, as `clusterfuse info` reports it."""

    device: torch.device
    device_name: str
    compute_capability: tuple[int, int] | None
    nvcc: str | None

    @property
    def is_hopper(self) -> bool:
        return self.compute_capability == (9, 0)

    @property
    def fused_possible(self) -> bool:
        return self.is_hopper and self.nvcc is not None

    def fused_unavailable_reason(self) -> str | None:
        if self.device.type != "cuda":
            return "no CUDA GPU"
        if not self.is_hopper:
            cc = self.compute_capability
            return f"{self.device_name} has compute capability {cc[0]}.{cc[1]}, the fused kernels need 9.0 (Hopper)"
        if self.nvcc is None:
            return ("nvcc was not found in $CUDA_HOME, $CUDA_PATH, PATH or /usr/local/cuda "
                    "(needed to build the fused kernels)")
        return None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the current CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # meta, mps, ...: nothing here runs there
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N; got {name!r:.80}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r} requested but there are {torch.cuda.device_count()} CUDA GPUs")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: expected one of auto, {', '.join(DTYPES)}; got {name!r}") from None


def detect_platform(device: torch.device) -> Platform:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return Platform(device, props.name, (props.major, props.minor), find_nvcc())
    return Platform(device, "cpu", None, find_nvcc())


#: Model families the fused and torch backends run (the reference runs every family).
FUSED_FAMILIES = ("llama", "deepseek_v2")
TORCH_FAMILIES = ("llama",)


def fused_shape_problem(config: ModelConfig, dtype: torch.dtype) -> str | None:
    """Why the fused kernels cannot run ``config`` in ``dtype``, or None: the ops' own rules on a model's
    dimensions (the ``check_model_shape`` of `clusterfuse.ops.attention_block`, `ffn_block`, and for
    DeepSeek-V2 `mla_block` and `moe_block`), so they live in one place; nothing is allocated."""
    from clusterfuse.ops import attention_block as attn_op
    from clusterfuse.ops import ffn_block as ffn_op

    c = config
    if dtype not in attn_op.KERNEL_DTYPES:
        return f"the fused kernels run bfloat16 or float16 weights (dtype: got {dtype})"
    try:
        if c.family == "deepseek_v2":
            deepseek_shape_check(c)
        else:
            attn_op.check_model_shape(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            ffn_op.check_model_shape(c.hidden_size, c.intermediate_size)
    except ValueError as err:
        return f"the fused kernels do not take this model's shape ({err})"
    return None


def deepseek_shape_check(config: ModelConfig) -> None:
    """The fused MLA, MoE and FFN ops' rules on a DeepSeek-V2 config (ValueError naming the first
    one broken): every layer's MLA block; the MoE layers' routing and shapes; the dense layers' FFN."""
    from clusterfuse.ops import ffn_block as ffn_op
    from clusterfuse.ops import mla_block as mla_op
    from clusterfuse.ops import moe_block as moe_op

    c, moe = config, config.moe
    if c.mla is None:
        raise ValueError("config.mla: a deepseek_v2 config without MLA fields")
    mla_op.check_model_shape(c.hidden_size, c.num_attention_heads, c.mla)
    layers = range(c.num_hidden_layers)
    if moe is not None and any(moe.is_moe_layer(i) for i in layers):
        moe_op.check_model_shape(c.hidden_size, moe.moe_intermediate_size, moe.n_routed_experts,
                                 moe_op.MoeRouting.from_config(moe), moe.n_shared_experts * moe.moe_intermediate_size)
    if moe is None or not all(moe.is_moe_layer(i) for i in layers):
        ffn_op.check_model_shape(c.hidden_size, c.intermediate_size)


def resolve_backend(requested: str, platform: Platform, family: str = "llama", *,
                    config: ModelConfig | None = None, dtype: torch.dtype | None = None) -> str:
    """The backend that will run (module docstring). ``auto`` falls back fused → torch → reference,
    logging the reason once; a forced backend that cannot run raises ``ValueError`` naming why.
    With ``config`` (and the weights' ``dtype``, default bf16), the fused kernels' shape rules are
    checked too (`fused_shape_problem`). The Llama family's features (attention bias, QK-norm, a
    sliding window) are all in the fused attention block. DeepSeek-V2 runs fused or on the reference
    (the torch backend refuses it)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}; got {requested!r}")
    if config is not None:
        family = config.family
    reason = platform.fused_unavailable_reason()
    if reason is None and family not in FUSED_FAMILIES:
        reason = f"the fused decode engine runs the {', '.join(FUSED_FAMILIES)} family, not {family}"
    if reason is None and config is not None:
        reason = fused_shape_problem(config, dtype or torch.bfloat16)
    torch_reason = None
    if platform.device.type != "cuda":
        torch_reason = "no CUDA GPU"
    elif family not in TORCH_FAMILIES:
        torch_reason = f"the torch backend runs the {', '.join(TORCH_FAMILIES)} family, not {family}"
    if requested == "fused":
        if reason:
            raise ValueError(f"backend: 'fused' requested but {reason}")
        return "fused"
    if requested == "torch":
        if torch_reason:
            raise ValueError(f"backend: 'torch' requested but {torch_reason}")
        return "torch"
    if requested == "auto":
        if reason is None:
            return "fused"
        if torch_reason is None:
            log.info("using the torch backend (PyTorch ops under CUDA graphs): %s", reason)
            return "torch"
        log.info("using the reference backend: %s", "; ".join(dict.fromkeys((reason, torch_reason))))
    return "reference"


def build_backend(chosen: str, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                  device: torch.device) -> Any:
    """The GPU `DecoderBackend` named ``chosen`` (``fused`` or ``torch``, a `resolve_backend` result)
    over ``weights``. The reference backend is the engine's adapter over a reference model
    (``clusterfuse.engine.reference_backend``), built by the engine."""
    if chosen == "fused" and config.family == "deepseek_v2":  # imports the kernels' ops: only where they run
        from clusterfuse.engine.fused_deepseek import FusedDeepseekModel

        return FusedDeepseekModel(config, weights, device=device)
    if chosen == "fused":
        from clusterfuse.engine.fused_model import FusedModel

        return FusedModel(config, weights, device=device)
    if chosen == "torch":
        from clusterfuse.engine.torch_model import TorchModel

        return TorchModel(config, weights, device=device)
    raise ValueError(f"backend: build_backend builds 'fused' or 'torch', got {chosen!r}")
