"""Model configuration: one dataclass for every architecture clusterfuse runs.

A `ModelConfig` is built from a Hugging Face ``config.json`` (``from_hf_dict`` /
``from_hf_dir``), from GGUF metadata (``clusterfuse.models.gguf_loader``), or from a
preset name (``clusterfuse.models.presets``).  Field names follow Hugging Face so
that a reader who knows ``transformers`` knows these.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that clusterfuse cannot run (unknown architecture, missing field)."""


#: Hugging Face ``architectures`` entries we run, mapped to our model family.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "DeepseekV2ForCausalLM": "deepseek_v2",
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

    family: str  # "llama" (Llama, Mistral, Qwen2) or "deepseek_v2"
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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.family not in ("llama", "deepseek_v2"):
            raise ConfigError(f"family: expected 'llama' or 'deepseek_v2', got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
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
        try:
            data = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from e
        return cls.from_hf_dict(data, name=path.name)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], name: str = "") -> ModelConfig:
        archs = data.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            shown = archs[0] if archs else data.get("model_type", "<none>")
            raise ConfigError(
                f"architectures: unsupported architecture {shown!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if data.get(key) is None:
                raise ConfigError(f"config.json: missing required field {key!r} for {arch}")
            return data[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        eos = data.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        mla = moe = None
        if family == "deepseek_v2":
            mla = MLAConfig(
                kv_lora_rank=int(need("kv_lora_rank")),
                qk_nope_head_dim=int(need("qk_nope_head_dim")),
                qk_rope_head_dim=int(need("qk_rope_head_dim")),
                v_head_dim=int(need("v_head_dim")),
                q_lora_rank=data.get("q_lora_rank"),
            )
            if data.get("n_routed_experts"):
                moe = MoEConfig(
                    n_routed_experts=int(data["n_routed_experts"]),
                    num_experts_per_tok=int(need("num_experts_per_tok")),
                    moe_intermediate_size=int(need("moe_intermediate_size")),
                    n_shared_experts=int(data.get("n_shared_experts") or 0),
                    first_k_dense_replace=int(data.get("first_k_dense_replace") or 0),
                    moe_layer_freq=int(data.get("moe_layer_freq") or 1),
                    routed_scaling_factor=float(data.get("routed_scaling_factor") or 1.0),
                    norm_topk_prob=bool(data.get("norm_topk_prob", False)),
                    topk_method=str(data.get("topk_method") or "greedy"),
                    n_group=data.get("n_group"),
                    topk_group=data.get("topk_group"),
                    scoring_func=str(data.get("scoring_func") or "softmax"),
                )
            head_dim = mla.v_head_dim
        else:
            head_dim = int(data.get("head_dim") or hidden // heads)
        return cls(
            family=family,
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(data.get("rms_norm_eps") or 1e-6),
            rope=rope_from_hf(data),
            max_position_embeddings=int(data.get("max_position_embeddings") or 4096),
            attention_bias=bool(data.get("attention_bias", arch == "Qwen2ForCausalLM")),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=data.get("bos_token_id"),
            eos_token_ids=eos_ids,
            mla=mla,
            moe=moe,
            name=name,
        )


def rope_from_hf(data: dict[str, Any]) -> RopeConfig:
    """Read rope parameters from either the classic (``rope_theta`` + ``rope_scaling``)
    or the transformers>=5 (``rope_parameters``) spelling of a config."""
    params = dict(data.get("rope_parameters") or {})
    scaling = dict(data.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", data.get("rope_theta", 10000.0)))
    kind = str(merged.get("rope_type", merged.get("type", "default")) or "default")
    if kind not in ("default", "llama3", "yarn", "linear"):
        raise ConfigError(f"rope_scaling: unsupported rope type {kind!r} (supported: default, linear, llama3, yarn)")
    fields = {f.name for f in dataclasses.fields(RopeConfig)} - {"theta", "kind"}
    kwargs = {k: merged[k] for k in fields if merged.get(k) is not None}
    return RopeConfig(theta=theta, kind=kind, **kwargs)
