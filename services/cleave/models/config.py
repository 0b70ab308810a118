"""The subset of a Hugging Face ``config.json`` the engine needs, for the Llama
family (Llama, SmolLM2, Qwen2) and its MoE relatives (Mixtral, Qwen2-MoE)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DENSE_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama"}
MOE_ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}


@dataclass(slots=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str = "float32"
    # MoE; num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: frozenset[int] = field(default_factory=frozenset)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        raw = json.loads(config_path.read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        (arch,) = raw.get("architectures") or ["?"]
        family = DENSE_ARCHITECTURES.get(arch) or MOE_ARCHITECTURES.get(arch)
        if family is None:
            supported = sorted(DENSE_ARCHITECTURES | MOE_ARCHITECTURES)
            raise ValueError(f"unsupported architecture {arch!r}; supported: {supported}")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported rope scaling {rope_type!r}")
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        layers = raw["num_hidden_layers"]
        config = cls(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw.get("intermediate_size", 0),
            num_hidden_layers=layers,
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", family in ("qwen2", "qwen2_moe")),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )
        if family == "mixtral":
            config.num_experts = raw["num_local_experts"]
            config.num_experts_per_tok = raw["num_experts_per_tok"]
            config.moe_intermediate_size = raw["intermediate_size"]
            config.norm_topk_prob = True
            config.moe_layers = frozenset(range(layers))
        elif family == "qwen2_moe":
            config.num_experts = raw["num_experts"]
            config.num_experts_per_tok = raw["num_experts_per_tok"]
            config.moe_intermediate_size = raw["moe_intermediate_size"]
            config.shared_expert_intermediate_size = raw.get("shared_expert_intermediate_size", 0)
            config.norm_topk_prob = raw.get("norm_topk_prob", False)
            step = raw.get("decoder_sparse_step", 1)
            dense_only = set(raw.get("mlp_only_layers") or [])
            config.moe_layers = frozenset(
                i for i in range(layers) if i not in dense_only and step > 0 and (i + 1) % step == 0
            )
        return config
