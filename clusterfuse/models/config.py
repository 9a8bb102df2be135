"""Model configuration: one dataclass for every architecture clusterfuse runs.

A `ModelConfig` is built from a Hugging Face ``config.json`` (``from_hf_dict`` /
``from_hf_dir``), from GGUF metadata (``clusterfuse.models.gguf_loader``), or from a
preset name (``clusterfuse.models.presets``).  Field names follow Hugging Face so
that a reader who knows ``transformers`` knows these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterfuse.models.validate import (
    ConfigError,
    config_bool,
    config_float,
    config_int,
    config_str,
    json_object,
    read_json_object,
    token_ids,
)

__all__ = ["ConfigError", "MLAConfig", "ModelConfig", "MoEConfig", "RopeConfig", "SUPPORTED_ARCHITECTURES"]


#: Hugging Face ``architectures`` entries we run, mapped to our model family.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",  # Llama + per-head RMSNorm of q and k (``qk_norm``)
    "Phi3ForCausalLM": "llama",  # Llama with fused qkv_proj / gate_up_proj in the checkpoint (split at load)
    "DeepseekV2ForCausalLM": "deepseek_v2",
}

#: ``model_type`` → architecture, for a config.json without ``architectures`` (some exports omit it).
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters.

    ``kind`` is ``"default"``, ``"llama3"`` (Llama-3.1 frequency scaling) or ``"yarn"``
    (DeepSeek-V2).  Parameters not used by ``kind`` keep their defaults.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V2 multi-head latent attention."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: plain q_proj (DeepSeek-V2-Lite)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek-V2 mixture of experts (top-k routing plus always-on shared experts)."""

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0  # the first k layers use a dense MLP
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    topk_method: str = "greedy"  # "greedy" or "group_limited_greedy"
    n_group: int | None = None
    topk_group: int | None = None
    scoring_func: str = "softmax"

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a decoder-only model."""

    family: str  # "llama" (Llama, Mistral, Qwen2, Qwen3, Phi-3) or "deepseek_v2"
    architecture: str  # the Hugging Face class name
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k after the projection, before RoPE
    sliding_window: int | None = None  # attend to the last W positions only (Mistral-v0.1, Phi-3, Qwen2 option)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    name: str = ""

    def __post_init__(self) -> None:
        # Every loader ends here, so every field is checked here: type, range, and an upper bound that
        # stops a hostile value (num_hidden_layers: 1e9) before any loop or allocation uses it.
        if self.family not in ("llama", "deepseek_v2"):
            raise ConfigError(f"family: expected 'llama' or 'deepseek_v2', got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            config_int(getattr(self, name), name)
        config_float(self.rms_norm_eps, "rms_norm_eps", maximum=1.0)
        _check_rope(self.rope)
        if self.sliding_window is not None:
            config_int(self.sliding_window, "sliding_window")
        if self.bos_token_id is not None:
            token_ids(self.bos_token_id, "bos_token_id")
        token_ids(list(self.eos_token_ids), "eos_token_id")
        if self.mla is not None:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                config_int(getattr(self.mla, name), name)
            if self.mla.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim: expected an even number, got {self.mla.qk_rope_head_dim}")
            if self.mla.q_lora_rank is not None:
                config_int(self.mla.q_lora_rank, "q_lora_rank")
        if self.moe is not None:
            _check_moe(self.moe)
        if self.family == "llama" and self.head_dim % 2:
            raise ConfigError(f"head_dim: expected an even number (rotary embedding pairs), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}")
        if self.family == "deepseek_v2" and self.mla is None:
            raise ConfigError("deepseek_v2 needs MLA fields (kv_lora_rank, qk_nope_head_dim, ...)")

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: no config.json found (expected a Hugging Face model directory)")
        data = read_json_object(cfg_file)
        try:
            return cls.from_hf_dict(data, name=path.name)
        except ConfigError as e:
            raise ConfigError(f"{cfg_file}: {e}") from e

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], name: str = "") -> ModelConfig:
        data = json_object(data, "config.json")
        archs = data.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"architectures: expected a list of class names, got {archs!r:.80}")
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs:
            arch = MODEL_TYPES.get(config_str(data.get("model_type", ""), "model_type"))
        if arch is None:
            shown = archs[0] if archs else data.get("model_type", "<none>")
            raise ConfigError(
                f"architectures: unsupported architecture {shown!r:.80}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if data.get(key) is None:
                raise ConfigError(f"missing required field {key!r} for {arch}")
            return data[key]

        def integer(key: str, default: int | None = None, minimum: int = 1) -> int:
            value = data.get(key)
            return config_int(need(key) if default is None else default if value is None else value, key,
                              minimum=minimum)

        def number(key: str, default: float) -> float:
            value = data.get(key)
            return default if value is None else config_float(value, key, minimum=0.0)

        def flag(key: str, default: bool) -> bool:
            value = data.get(key)
            return default if value is None else config_bool(value, key)

        heads = integer("num_attention_heads")
        hidden = integer("hidden_size")
        eos = data.get("eos_token_id")
        mla = moe = None
        if family == "deepseek_v2":
            q_lora = data.get("q_lora_rank")
            mla = MLAConfig(
                kv_lora_rank=integer("kv_lora_rank"),
                qk_nope_head_dim=integer("qk_nope_head_dim"),
                qk_rope_head_dim=integer("qk_rope_head_dim"),
                v_head_dim=integer("v_head_dim"),
                q_lora_rank=None if q_lora is None else config_int(q_lora, "q_lora_rank"),
            )
            if data.get("n_routed_experts"):
                groups, topk_group = data.get("n_group"), data.get("topk_group")
                moe = MoEConfig(
                    n_routed_experts=integer("n_routed_experts"),
                    num_experts_per_tok=integer("num_experts_per_tok"),
                    moe_intermediate_size=integer("moe_intermediate_size"),
                    n_shared_experts=integer("n_shared_experts", 0, minimum=0),
                    first_k_dense_replace=integer("first_k_dense_replace", 0, minimum=0),
                    moe_layer_freq=integer("moe_layer_freq", 1),
                    routed_scaling_factor=number("routed_scaling_factor", 1.0),
                    norm_topk_prob=flag("norm_topk_prob", False),
                    topk_method=config_str(data.get("topk_method") or "greedy", "topk_method"),
                    n_group=None if groups is None else config_int(groups, "n_group"),
                    topk_group=None if topk_group is None else config_int(topk_group, "topk_group"),
                    scoring_func=config_str(data.get("scoring_func") or "softmax", "scoring_func"),
                )
            head_dim = mla.v_head_dim
        else:
            head_dim = integer("head_dim", max(hidden // heads, 1))
            rotary = config_float(rope_parameters(data).get("partial_rotary_factor", 1.0), "partial_rotary_factor")
            if rotary != 1.0:  # Phi-4-mini
                raise ConfigError(f"partial_rotary_factor: only 1.0 (RoPE over the whole head) is supported, "
                                  f"got {rotary}")
        bos = token_ids(data["bos_token_id"], "bos_token_id") if data.get("bos_token_id") is not None else ()
        return cls(
            family=family,
            architecture=arch,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=integer("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope=rope_from_hf(data),
            max_position_embeddings=integer("max_position_embeddings", 4096),
            attention_bias=flag("attention_bias", arch == "Qwen2ForCausalLM"),
            tie_word_embeddings=flag("tie_word_embeddings", False),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding_window_from_hf(data, arch, integer("num_hidden_layers")),
            bos_token_id=bos[0] if bos else None,  # a list (some configs write one) starts with the BOS token
            eos_token_ids=() if eos is None else token_ids(eos, "eos_token_id"),
            mla=mla,
            moe=moe,
            name=name,
        )


def _check_rope(rope: RopeConfig) -> None:
    config_float(rope.theta, "rope_theta")
    config_float(rope.factor, "rope_scaling.factor")
    for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        config_float(getattr(rope, name), f"rope_scaling.{name}")
    for name in ("mscale", "mscale_all_dim"):
        config_float(getattr(rope, name), f"rope_scaling.{name}", inclusive=True)
    if rope.original_max_position_embeddings is not None:
        config_int(rope.original_max_position_embeddings, "original_max_position_embeddings")
    if rope.kind == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
        raise ConfigError(f"rope_scaling.high_freq_factor: expected more than low_freq_factor "
                          f"({rope.low_freq_factor}), got {rope.high_freq_factor}")


def _check_moe(moe: MoEConfig) -> None:
    for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq"):
        config_int(getattr(moe, name), name)
    for name in ("n_shared_experts", "first_k_dense_replace"):
        config_int(getattr(moe, name), name, minimum=0)
    if moe.num_experts_per_tok > moe.n_routed_experts:
        raise ConfigError(f"num_experts_per_tok: {moe.num_experts_per_tok} is more than n_routed_experts "
                          f"{moe.n_routed_experts}")
    config_float(moe.routed_scaling_factor, "routed_scaling_factor")
    if moe.topk_method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"topk_method: expected 'greedy' or 'group_limited_greedy', got {moe.topk_method!r:.80}")
    if moe.scoring_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"scoring_func: expected 'softmax' or 'sigmoid', got {moe.scoring_func!r:.80}")
    if moe.topk_method == "group_limited_greedy":
        groups = config_int(moe.n_group, "n_group")
        config_int(moe.topk_group, "topk_group", maximum=groups)
        if moe.n_routed_experts % groups:
            raise ConfigError(f"n_group: {groups} does not divide n_routed_experts {moe.n_routed_experts}")


def sliding_window_from_hf(data: dict[str, Any], arch: str, num_layers: int) -> int | None:
    """The attention window of every layer, or None for full attention.

    Mistral and Phi-3 read ``sliding_window`` (null: none); Qwen2/Qwen3 only with ``use_sliding_window``,
    and there only the layers from ``max_window_layers`` on are windowed: a mix of windowed and full
    layers is refused (one window for the whole model is what the backends run)."""
    window = data.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not data.get("use_sliding_window") or window is None:
            return None
        first = config_int(data.get("max_window_layers", 0), "max_window_layers", minimum=0)
        if first >= num_layers:
            return None
        if first > 0:
            raise ConfigError(f"max_window_layers: sliding window on layers {first}.. only (full attention "
                              "below) is not supported; only a window on every layer")
    elif arch not in ("MistralForCausalLM", "Phi3ForCausalLM") or window is None:
        return None
    return config_int(window, "sliding_window")


def rope_parameters(data: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters of either the classic (``rope_scaling``) or the transformers>=5
    (``rope_parameters``) spelling of a config, merged."""
    params = json_object(data.get("rope_parameters") or {}, "rope_parameters")
    scaling = json_object(data.get("rope_scaling") or {}, "rope_scaling")
    merged = {**scaling, **params}
    if data.get("partial_rotary_factor") is not None:  # transformers 4 spells it at the top level
        merged.setdefault("partial_rotary_factor", data["partial_rotary_factor"])
    return merged


def rope_from_hf(data: dict[str, Any]) -> RopeConfig:
    """Read rope parameters from either the classic (``rope_theta`` + ``rope_scaling``)
    or the transformers>=5 (``rope_parameters``) spelling of a config."""
    merged = rope_parameters(data)
    theta = config_float(merged.get("rope_theta", data.get("rope_theta", 10000.0)), "rope_theta")
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ("default", "llama3", "yarn", "linear"):
        raise ConfigError(f"rope_scaling: unsupported rope type {kind!r:.80} (supported: default, linear, llama3, "
                          "yarn)")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(RopeConfig):
        value = merged.get(f.name)
        if f.name in ("theta", "kind") or value is None:
            continue
        kwargs[f.name] = (config_int(value, f.name) if f.name == "original_max_position_embeddings"
                          else config_float(value, f"rope_scaling.{f.name}", inclusive=True))
    return RopeConfig(theta=theta, kind=kind, **kwargs)
