"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into :class:`CausalLM`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from cleave.models.causal_lm import CausalLM
from cleave.models.config import ModelConfig
from cleave.models.layers import RotaryEmbedding
from cleave.models.moe import SparseMoeBlock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name.removeprefix("model.")] = handle.get_tensor(name)
    return tensors


class _Weights:
    """Pops tensors by name so that anything left over at the end is reported."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def take(self, name: str) -> torch.Tensor:
        try:
            return self.tensors.pop(name)
        except KeyError:
            raise KeyError(f"checkpoint lacks tensor {name!r}") from None

    def has(self, name: str) -> bool:
        return name in self.tensors


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> CausalLM:
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):
        model = CausalLM(config)
    weights = _Weights(read_checkpoint(path))
    state: dict[str, torch.Tensor] = {
        "embed_tokens.weight": weights.take("embed_tokens.weight"),
        "norm.weight": weights.take("norm.weight"),
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = weights.take("lm_head.weight")
    elif weights.has("lm_head.weight"):
        weights.take("lm_head.weight")
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}{norm}.weight"] = weights.take(f"{prefix}{norm}.weight")
        attn = prefix + "self_attn."
        state[attn + "qkv_proj.weight"] = torch.cat([weights.take(f"{attn}{p}_proj.weight") for p in "qkv"])
        if config.attention_bias:
            state[attn + "qkv_proj.bias"] = torch.cat([weights.take(f"{attn}{p}_proj.bias") for p in "qkv"])
        state[attn + "o_proj.weight"] = weights.take(attn + "o_proj.weight")
        if isinstance(layer.mlp, SparseMoeBlock):
            state.update(_moe_state(weights, config, prefix))
        else:
            state.update(_mlp_state(weights, prefix + "mlp.", prefix + "mlp."))
    if weights.tensors:
        unused = sorted(weights.tensors)[:8]
        raise ValueError(f"checkpoint has tensors this model does not use, e.g. {unused}")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    torch_dtype = DTYPES[dtype]
    model.to_empty(device=device)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers made on the meta device hold nothing: compute RoPE's tables for real.
    with torch.device(device):
        rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
    for layer in model.layers:
        layer.self_attn.rotary = rotary
    model.rotary = rotary
    model.eval()
    if config.is_moe:
        model.set_expert_backend(model.local_expert_backend())
    return model


def _mlp_state(weights: _Weights, source: str, target: str) -> dict[str, torch.Tensor]:
    return {
        target + "gate_up_proj.weight": torch.cat(
            [weights.take(source + "gate_proj.weight"), weights.take(source + "up_proj.weight")]
        ),
        target + "down_proj.weight": weights.take(source + "down_proj.weight"),
    }


def _moe_state(weights: _Weights, config: ModelConfig, prefix: str) -> dict[str, torch.Tensor]:
    target = prefix + "mlp."
    source = prefix + ("block_sparse_moe." if weights.has(prefix + "block_sparse_moe.gate.weight") else "mlp.")
    state = {target + "gate.weight": weights.take(source + "gate.weight")}
    if weights.has(source + "experts.gate_up_proj"):  # transformers v5 fused layout
        state[target + "experts.gate_up"] = weights.take(source + "experts.gate_up_proj")
        state[target + "experts.down"] = weights.take(source + "experts.down_proj")
    else:
        names = ("w1", "w3", "w2") if config.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        gate_up, down = [], []
        for e in range(config.num_experts):
            expert = f"{source}experts.{e}."
            gate_up.append(torch.cat([weights.take(f"{expert}{names[0]}.weight"), weights.take(f"{expert}{names[1]}.weight")]))
            down.append(weights.take(f"{expert}{names[2]}.weight"))
        state[target + "experts.gate_up"] = torch.stack(gate_up)
        state[target + "experts.down"] = torch.stack(down)
    if config.shared_expert_intermediate_size:
        state.update(_mlp_state(weights, source + "shared_expert.", target + "shared_expert."))
        state[target + "shared_expert_gate.weight"] = weights.take(source + "shared_expert_gate.weight")
    return state
