"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into :class:`CausalLM`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from cleave.models.causal_lm import CausalLM
from cleave.models.config import ModelConfig
from cleave.models.moe import ExpertBackend, SparseMoeBlock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Checkpoint:
    """The tensors of a folder's ``*.safetensors`` files by name (without the ``model.``
    prefix), read lazily; remembers which were read, so unused ones can be reported."""

    def __init__(self, path: str | Path) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors weights")
        self.where: dict[str, tuple] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt")
            for name in handle.keys():
                self.where[name.removeprefix("model.")] = (handle, name)
        self.taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        handle, full = self._locate(name)
        return handle.get_tensor(full)

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice."""
        handle, full = self._locate(name)
        return handle.get_slice(full)[index]

    def skip(self, name: str) -> None:
        """Count ``name`` as used without reading it (a tensor served elsewhere)."""
        self._locate(name)

    def untaken(self) -> list[str]:
        return sorted(set(self.where) - self.taken)

    def _locate(self, name: str) -> tuple:
        try:
            located = self.where[name]
        except KeyError:
            raise KeyError(f"checkpoint lacks tensor {name!r}") from None
        self.taken.add(name)
        return located


def expert_tensor_names(checkpoint: Checkpoint, config: ModelConfig, layer: int, expert: int) -> list[str]:
    """The checkpoint tensors one routed expert is read from: transformers v5's fused
    ``experts.gate_up_proj`` and ``experts.down_proj`` (one row each, shared by the
    layer's experts), or its own gate, up and down (Mixtral's w1/w3/w2, Qwen2-MoE's
    gate/up/down_proj)."""
    source = _moe_source(checkpoint, layer)
    if checkpoint.has(source + "experts.gate_up_proj"):
        return [source + "experts.gate_up_proj", source + "experts.down_proj"]
    names = ("w1", "w3", "w2") if config.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return [f"{source}experts.{expert}.{name}.weight" for name in names]


def expert_tensors(checkpoint: Checkpoint, config: ModelConfig, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One routed expert's ``gate_up`` [2I, H] and ``down`` [H, I], in either layout."""
    names = expert_tensor_names(checkpoint, config, layer, expert)
    if len(names) == 2:
        return checkpoint.get_row(names[0], expert), checkpoint.get_row(names[1], expert)
    gate, up, down = (checkpoint.get(name) for name in names)
    return torch.cat([gate, up]), down


def _moe_source(checkpoint: Checkpoint, layer: int) -> str:
    prefix = f"layers.{layer}."
    return prefix + ("block_sparse_moe." if checkpoint.has(prefix + "block_sparse_moe.gate.weight") else "mlp.")


def load_model(
    path: str | Path, dtype: str = "float32", device: str = "cpu", expert_backend: ExpertBackend | None = None
) -> CausalLM:
    """The model at ``path``. With ``expert_backend`` (an MoE model only) the routed
    experts run there: their tensors are neither read nor held here, while every other
    tensor, Qwen2-MoE's shared expert included, loads as usual."""
    config = ModelConfig.from_pretrained(path)
    if expert_backend is not None and not config.is_moe:
        raise ValueError(f"{path} is a dense model: only a Mixture-of-Experts model can run its experts elsewhere")
    with torch.device("meta"):
        model = CausalLM(config, expert_backend)
    weights = Checkpoint(path)
    state: dict[str, torch.Tensor] = {
        "embed_tokens.weight": weights.get("embed_tokens.weight"),
        "norm.weight": weights.get("norm.weight"),
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = weights.get("lm_head.weight")
    elif weights.has("lm_head.weight"):
        weights.taken.add("lm_head.weight")
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}{norm}.weight"] = weights.get(f"{prefix}{norm}.weight")
        attn = prefix + "self_attn."
        state[attn + "qkv_proj.weight"] = torch.cat([weights.get(f"{attn}{p}_proj.weight") for p in "qkv"])
        if config.attention_bias:
            state[attn + "qkv_proj.bias"] = torch.cat([weights.get(f"{attn}{p}_proj.bias") for p in "qkv"])
        state[attn + "o_proj.weight"] = weights.get(attn + "o_proj.weight")
        if isinstance(layer.mlp, SparseMoeBlock):
            state.update(_moe_state(weights, config, i, routed=expert_backend is None))
        else:
            state.update(_mlp_state(weights, prefix + "mlp.", prefix + "mlp."))
    if unused := weights.untaken():
        raise ValueError(f"checkpoint has tensors this model does not use, e.g. {unused[:8]}")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    torch_dtype = DTYPES[dtype]
    # RoPE's tables were computed on the CPU (CausalLM): kept out of to_empty's reach,
    # which would leave their buffers uninitialised, then moved.
    rotary = model.rotary
    del model.rotary
    model.to_empty(device=device)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = rotary.to(device)
    model.eval()
    if config.is_moe:
        model.set_expert_backend(model.local_expert_backend() if expert_backend is None else expert_backend)
    return model


def _mlp_state(weights: Checkpoint, source: str, target: str) -> dict[str, torch.Tensor]:
    return {
        target + "gate_up_proj.weight": torch.cat(
            [weights.get(source + "gate_proj.weight"), weights.get(source + "up_proj.weight")]
        ),
        target + "down_proj.weight": weights.get(source + "down_proj.weight"),
    }


def _moe_state(weights: Checkpoint, config: ModelConfig, layer: int, routed: bool = True) -> dict[str, torch.Tensor]:
    """The block's tensors; without ``routed`` its routed experts' are skipped."""
    target = f"layers.{layer}.mlp."
    source = _moe_source(weights, layer)
    state = {target + "gate.weight": weights.get(source + "gate.weight")}
    if routed:
        experts = [expert_tensors(weights, config, layer, e) for e in range(config.num_experts)]
        state[target + "experts.gate_up"] = torch.stack([gate_up for gate_up, _ in experts])
        state[target + "experts.down"] = torch.stack([down for _, down in experts])
    else:
        for name in {n for e in range(config.num_experts) for n in expert_tensor_names(weights, config, layer, e)}:
            weights.skip(name)
    if config.shared_expert_intermediate_size:
        state.update(_mlp_state(weights, source + "shared_expert.", target + "shared_expert."))
        state[target + "shared_expert_gate.weight"] = weights.get(source + "shared_expert_gate.weight")
    return state
