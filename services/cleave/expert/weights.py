"""Read only the held experts of an MoE checkpoint: a replica of a large model holds a
fraction of its experts and must not load (or even read) the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from cleave.expert.spec import Pair
from cleave.models.config import ModelConfig
from cleave.models.loader import DTYPES


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

        def run(expert: int, x: torch.Tensor) -> torch.Tensor:
            gate, up = F.linear(x, self.gate_up[layer, expert]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.down[layer, expert])

        return run


class _Checkpoint:
    """Tensor names (without the ``model.`` prefix) to their file, opened lazily."""

    def __init__(self, path: Path) -> None:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors weights")
        self.handles = [safe_open(str(file), framework="pt") for file in files]
        self.where = {}
        for handle in self.handles:
            for name in handle.keys():
                self.where[name.removeprefix("model.")] = (handle, name)

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        try:
            handle, full = self.where[name]
        except KeyError:
            raise KeyError(f"checkpoint lacks tensor {name!r}") from None
        return handle.get_tensor(full)

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice."""
        handle, full = self.where[name]
        return handle.get_slice(full)[index]


def load_experts(path: str | Path, pairs: frozenset[Pair], dtype: str = "float32") -> HeldExperts:
    """Load the experts ``pairs`` of the checkpoint at ``path`` (both the per-expert
    layout and transformers v5's fused ``experts.gate_up_proj``)."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    if not config.is_moe:
        raise ValueError(f"{path} is not a Mixture-of-Experts model")
    checkpoint = _Checkpoint(path)
    torch_dtype = DTYPES[dtype]
    names = ("w1", "w3", "w2") if config.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    gate_up, down = {}, {}
    for layer, expert in sorted(pairs):
        prefix = f"layers.{layer}."
        source = prefix + ("block_sparse_moe." if checkpoint.has(prefix + "block_sparse_moe.gate.weight") else "mlp.")
        if checkpoint.has(source + "experts.gate_up_proj"):
            w_gate_up = checkpoint.get_row(source + "experts.gate_up_proj", expert)
            w_down = checkpoint.get_row(source + "experts.down_proj", expert)
        else:
            each = f"{source}experts.{expert}."
            w_gate_up = torch.cat([checkpoint.get(each + names[0] + ".weight"), checkpoint.get(each + names[1] + ".weight")])
            w_down = checkpoint.get(each + names[2] + ".weight")
        # Copied into fresh (64-byte aligned) memory, as each expert of the model's stacked
        # parameter is: a tensor left at its offset in the safetensors buffer may be
        # misaligned, and CPU kernels then take another path whose float sums differ.
        gate_up[layer, expert] = w_gate_up.to(torch_dtype, copy=True, memory_format=torch.contiguous_format)
        down[layer, expert] = w_down.to(torch_dtype, copy=True, memory_format=torch.contiguous_format)
    return HeldExperts(config, torch_dtype, gate_up, down)
