"""Token choice: greedy, or temperature / top-k / top-p sampling by inverse CDF.

Inverse-CDF sampling draws exactly one uniform number per token from the
request's own generator, so a seeded request picks the same tokens whatever it
is batched with; logprobs are those of the model's raw distribution."""

from __future__ import annotations

import torch

from cleave.engine.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> tuple[list[int], list[float | None]]:
    """logits: [S, V] float32. Returns the chosen token id per row, and its logprob for
    the rows that asked for logprobs (None elsewhere)."""
    logits = logits.float().cpu()
    chosen = logits.argmax(dim=-1)
    for row, p in enumerate(params):
        if not p.is_greedy:
            chosen[row] = _sample_row(logits[row], p, generators[row] or default_generator)
    tokens = chosen.tolist()
    logprobs: list[float | None] = [None] * len(params)
    rows = [row for row, p in enumerate(params) if p.logprobs]
    if rows:
        picked = torch.log_softmax(logits[rows], dim=-1).gather(1, chosen[rows, None])[:, 0].tolist()
        for row, logprob in zip(rows, picked):
            logprobs[row] = logprob
    return tokens, logprobs


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    scaled = logits / p.temperature
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(descending=True, stable=True)
    if p.top_p < 1.0:
        cumulative = sorted_probs.cumsum(0)
        # Keep the smallest head whose mass reaches top_p (always at least one token).
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= p.top_p, 0.0)
    cdf = sorted_probs.cumsum(0)
    u = torch.rand((), generator=generator) * cdf[-1]
    position = int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[0] - 1))
    while sorted_probs[position] == 0:  # u landed past the kept mass by rounding
        position -= 1
    return int(order[position])
