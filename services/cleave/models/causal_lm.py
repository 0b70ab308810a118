"""One decoder-only model class for Llama, SmolLM2, Qwen2, Mixtral and Qwen2-MoE."""

from __future__ import annotations

import torch
from torch import nn

from cleave.models.attention import AttentionMetadata
from cleave.models.config import ModelConfig
from cleave.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from cleave.models.moe import ExpertBackend, LocalExpertBackend, SparseMoeBlock


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, routed_experts: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer in config.moe_layers:
            self.mlp: nn.Module = SparseMoeBlock(config, layer, routed_experts)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """With ``expert_backend`` the MoE layers' routed experts run there and the model
    holds none of their weights; by default they are the model's own."""

    def __init__(self, config: ModelConfig, expert_backend: ExpertBackend | None = None) -> None:
        super().__init__()
        self.config = config
        # Uninitialised, as every weight here: the checkpoint fills it (and Embedding's
        # normal_ init on meta would import torch._dynamo, see the rotary tables below).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        routed = expert_backend is None
        self.layers = nn.ModuleList(DecoderLayer(config, i, routed) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # On the CPU even under load_model's meta device: arithmetic on meta tensors goes
        # through torch._refs, whose first use imports torch._dynamo (~1.5 s a process).
        # load_model moves them to the model's device.
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings, "cpu")
        if config.is_moe:
            self.set_expert_backend(self.local_expert_backend() if expert_backend is None else expert_backend)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def local_expert_backend(self) -> LocalExpertBackend:
        if any(block.experts is None for block in self.moe_blocks()):
            raise ValueError("this model was loaded without its routed experts: no local backend")
        return LocalExpertBackend({block.layer: block.experts for block in self.moe_blocks()})

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        for block in self.moe_blocks():
            block.backend = backend

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, H] of the flat token batch (logits come from :meth:`logits`)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, rope, cache, meta)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
