from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature == 0`` is greedy.

    Stop *strings* are not here: they need text, and text belongs to the front end
    that owns the tokenizer (the router); it aborts the request when one matches.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
