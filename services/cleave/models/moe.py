"""Mixture-of-Experts layers. The layer routes tokens (top-k) itself and calls its
experts only through an :class:`ExpertBackend`, so the experts can live in this
process or in a pool of expert services without the model knowing."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cleave.models.config import ModelConfig
from cleave.models.layers import GatedMLP


class ExpertBackendError(RuntimeError):
    """The backend could not run the experts (replicas down or refusing the call): a
    failure of the expert pool, not of the request, and another try may succeed."""


class ExpertBackend(Protocol):
    """Runs the routed experts of MoE layers; raises :class:`ExpertBackendError` when it cannot."""

    def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Return sum_k topk_weights[t, k] * expert[topk_ids[t, k]](hidden[t]) for every
        token t of ``hidden`` ([T, H]); ``topk_ids`` and ``topk_weights`` are [T, k].
        All tokens of one layer arrive in one call, so a remote backend can send each
        replica its share in one request."""
        ...


class ExpertWeights(nn.Module):
    """The routed experts of one layer, stacked: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def run(self, expert: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return run_expert(self.gate_up[expert], self.down[expert], x, out)


def run_expert(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """One SwiGLU expert on the rows ``x`` ([T, H]): down(silu(gate(x)) * up(x)), gate and
    up stacked in ``gate_up``; written into ``out`` ([T, H]) when given."""
    hidden = F.linear(x, gate_up)
    half = hidden.shape[-1] // 2
    # In place on the gate half: the same arithmetic as silu(gate) * up without two
    # [tokens, intermediate] temporaries; down reads the strided half without a copy.
    gate = F.silu(hidden[..., :half], inplace=True).mul_(hidden[..., half:])
    if out is None or (torch.is_grad_enabled() and down.requires_grad):  # out= cannot be differentiated
        result = F.linear(gate, down)
        return result if out is None else out.copy_(result)
    # mm on the transposed weight is what F.linear runs for 2-D input (the same bits),
    # and it writes into the caller's rows instead of a new tensor to copy there.
    return torch.mm(gate, down.t(), out=out)


def expert_slot_outputs(
    run_expert, num_experts: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    held: set[int] | None = None,
) -> torch.Tensor:
    """Weighted output of every (token, k) slot, ``[T * k, H]``: tokens are grouped by
    expert and each hit expert runs once on its tokens. Slots of experts outside
    ``held`` stay zero, so a replica holding a subset fills only its own slots."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    # One gather puts every routed row next to the others of its expert, so each expert
    # reads a contiguous slice and writes its weighted output in place.
    grouped = hidden.index_select(0, order // top_k)
    weights = topk_weights.flatten().index_select(0, order).to(hidden.dtype)[:, None]
    outputs = torch.empty_like(grouped) if held is None else torch.zeros_like(grouped)
    # Each expert writes its rows in place and the routing weights scale all rows at
    # once: a decode step's call gives an expert two or three rows, where every tensor
    # op saved per expert (slice, copy, multiply) is worth more than its arithmetic.
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        if held is None or expert in held:
            run_expert(expert, grouped[start:end], outputs[start:end])
        start = end
    outputs.mul_(weights)
    # index_add_ on small CPU tensors costs milliseconds; a plain scatter does not.
    return torch.empty_like(outputs).index_copy_(0, order, outputs)


def accumulate_slots(slots: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Sum each token's slots in ascending expert order, the order Hugging Face
    accumulates in, so float32 results agree bit for bit wherever the slots came from."""
    num_tokens, top_k = topk_ids.shape
    if top_k == 2:
        # Float addition is commutative, so two slots need no reordering.
        pair = slots.view(num_tokens, 2, -1)
        return pair[:, 0] + pair[:, 1]
    slots = slots.view(num_tokens, top_k, -1).gather(
        1, topk_ids.argsort(dim=1, stable=True)[:, :, None].expand(-1, -1, slots.shape[-1])
    )
    out = slots[:, 0].clone()
    for k in range(1, top_k):
        out += slots[:, k]
    return out


def combine_experts(
    run_expert, num_experts: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """sum_k weight * expert(hidden) per token, every expert local."""
    return accumulate_slots(expert_slot_outputs(run_expert, num_experts, hidden, topk_ids, topk_weights), topk_ids)


class LocalExpertBackend:
    """Experts held in this process (the default, and what an expert service wraps)."""

    def __init__(self, layers: dict[int, ExpertWeights]) -> None:
        self.layers = layers

    def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        weights = self.layers[layer]
        return combine_experts(weights.run, weights.gate_up.shape[0], hidden, topk_ids, topk_weights)


class SparseMoeBlock(nn.Module):
    """Mixtral's and Qwen2-MoE's sparse block: softmax router, top-k, optional
    renormalisation, and Qwen2-MoE's sigmoid-gated shared expert. Without
    ``routed_experts`` the block holds no routed expert weights (``experts`` is None):
    a backend elsewhere runs them."""

    def __init__(self, config: ModelConfig, layer: int, routed_experts: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts: ExpertWeights | None = None
        if routed_experts:
            self.experts = ExpertWeights(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.backend: ExpertBackend | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        out = self.backend.forward(self.layer, x, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
