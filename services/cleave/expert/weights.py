"""Read only the held experts of an MoE checkpoint: a replica of a large model holds a
fraction of its experts and must not load (or even read) the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cleave.expert.spec import Pair
from cleave.models.config import ModelConfig
from cleave.models.loader import DTYPES, Checkpoint, expert_tensors
from cleave.models.moe import run_expert


@dataclass(slots=True)
class HeldExperts:
    """The held experts' weights: ``gate_up[(layer, expert)]`` [2I, H] and ``down`` [H, I],
    laid out as :class:`cleave.models.moe.ExpertWeights` slices them, so each expert
    computes exactly what the in-process one does."""

    config: ModelConfig
    dtype: torch.dtype
    gate_up: dict[Pair, torch.Tensor]
    down: dict[Pair, torch.Tensor]

    @property
    def pairs(self) -> frozenset[Pair]:
        return frozenset(self.gate_up)

    def held(self, layer: int) -> set[int]:
        return {expert for (each, expert) in self.gate_up if each == layer}

    def runner(self, layer: int):
        """``run(expert, x)`` for :func:`cleave.models.moe.expert_slot_outputs`."""

        def run(expert: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return run_expert(self.gate_up[layer, expert], self.down[layer, expert], x, out)

        return run


def load_experts(path: str | Path, pairs: frozenset[Pair], dtype: str = "float32") -> HeldExperts:
    """Load the experts ``pairs`` of the checkpoint at ``path`` (both the per-expert
    layout and transformers v5's fused ``experts.gate_up_proj``)."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    if not config.is_moe:
        raise ValueError(f"{path} is not a Mixture-of-Experts model")
    checkpoint = Checkpoint(path)
    torch_dtype = DTYPES[dtype]
    gate_up, down = {}, {}
    for layer, expert in sorted(pairs):
        w_gate_up, w_down = expert_tensors(checkpoint, config, layer, expert)
        # Copied into fresh (64-byte aligned) memory, as each expert of the model's stacked
        # parameter is: a tensor left at its offset in the safetensors buffer may be
        # misaligned, and CPU kernels then take another path whose float sums differ.
        gate_up[layer, expert] = w_gate_up.to(torch_dtype, copy=True, memory_format=torch.contiguous_format)
        down[layer, expert] = w_down.to(torch_dtype, copy=True, memory_format=torch.contiguous_format)
    return HeldExperts(config, torch_dtype, gate_up, down)
