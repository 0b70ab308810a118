"""Workload shapes for the load test: what each request asks for. A workload hands its
user the next `Job`; the users (locustfile.py) send it over REST or gRPC and time it.

Prompts are token id lists wherever the lengths matter, so a prompt of N tokens is N
tokens to the model whatever its tokenizer; the chat shape speaks text through the chat
template, as a chat client does."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SHAPES = ("fixed", "random", "chat", "mooncake")
# The Mooncake trace hashes its prompts in blocks of this many tokens.
MOONCAKE_BLOCK_TOKENS = 512


@dataclass
class Job:
    """One request to send: a token prompt or chat messages, and how many tokens to generate."""

    max_tokens: int
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    # time.monotonic() before which the request must not be sent (trace replay).
    not_before: float = 0.0


def parse_range(text: str) -> tuple[int, int]:
    """``"32:256"`` -> (32, 256), inclusive; a single number is a range of one."""
    low, _, high = text.partition(":")
    bounds = (int(low), int(high or low))
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"bad range {text!r}: want LOW:HIGH with 1 <= LOW <= HIGH")
    return bounds


class TokenSource:
    """Seeded token ids in [min_token_id, max_token_id): any model whose vocabulary is at
    least max_token_id long accepts them."""

    def __init__(self, seed: int, min_token_id: int, max_token_id: int) -> None:
        self.rng = random.Random(seed)
        self.low, self.high = min_token_id, max_token_id

    def draw(self, count: int) -> list[int]:
        return [self.rng.randrange(self.low, self.high) for _ in range(count)]


class FixedWorkload:
    """Every request: prompt_tokens random ids in, exactly output_tokens out."""

    def __init__(self, options, user_index: int) -> None:
        self.tokens = TokenSource(options.seed + user_index, options.min_token_id, options.max_token_id)
        self.prompt_tokens, self.output_tokens = options.prompt_tokens, options.output_tokens

    def next_job(self) -> Job:
        return Job(self.output_tokens, prompt_ids=self.tokens.draw(self.prompt_tokens))

    def record_reply(self, text: str) -> None:
        pass


class RandomWorkload(FixedWorkload):
    """Lengths drawn uniformly from --prompt-tokens-range and --output-tokens-range (seeded)."""

    def __init__(self, options, user_index: int) -> None:
        super().__init__(options, user_index)
        self.prompt_range = parse_range(options.prompt_tokens_range)
        self.output_range = parse_range(options.output_tokens_range)

    def next_job(self) -> Job:
        rng = self.tokens.rng
        return Job(rng.randint(*self.output_range), prompt_ids=self.tokens.draw(rng.randint(*self.prompt_range)))


def _words(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(count)]


class ChatWorkload:
    """Multi-turn chat: one system prompt shared by every user, then each user's own
    conversation grows by a user turn and the model's reply per request, so every request
    repeats the previous one as its prefix. After --chat-turns turns it starts over."""

    def __init__(self, options, user_index: int) -> None:
        self.rng = random.Random(options.seed + user_index)
        self.vocabulary = _words(options.seed, 500)
        self.system = {"role": "system", "content": " ".join(_words(options.seed + 10**6, options.chat_system_words))}
        self.turn_words, self.turns = options.chat_turn_words, options.chat_turns
        self.output_tokens = options.output_tokens
        self.messages: list[dict[str, str]] = []

    def next_job(self) -> Job:
        if len(self.messages) >= 2 * self.turns:
            self.messages = []
        question = " ".join(self.rng.choice(self.vocabulary) for _ in range(self.turn_words))
        self.messages.append({"role": "user", "content": question})
        return Job(self.output_tokens, messages=[self.system, *self.messages])

    def record_reply(self, text: str) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.append({"role": "assistant", "content": text})

    def forget_turn(self) -> None:
        """Drop a user turn whose request failed, so the conversation stays well formed."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


@dataclass
class TraceRecord:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: list[int] = field(default_factory=list)


def load_trace(path: Path, limit: int = 0) -> list[TraceRecord]:
    records = []
    with path.open() as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                records.append(TraceRecord(row["timestamp"], row["input_length"], row["output_length"], row["hash_ids"]))
                if limit and len(records) >= limit:
                    break
    return records


class TraceReplay:
    """The Mooncake trace, scaled and shared by all users: each request goes out at its
    timestamp times --trace-scale after the first one, with lengths times --length-scale.
    A hash id always expands to the same tokens, so requests that share hash ids share a
    token prefix, and the platform's prefix cache sees the trace's reuse."""

    def __init__(self, options) -> None:
        self.records = load_trace(Path(options.trace), options.trace_limit)
        if not self.records:
            raise ValueError(f"no requests in the trace {options.trace}")
        self.time_scale, self.length_scale = options.trace_scale, options.length_scale
        self.block_tokens = max(1, round(MOONCAKE_BLOCK_TOKENS * self.length_scale))
        self.max_prompt_tokens, self.max_output_tokens = options.max_prompt_tokens, options.max_output_tokens
        self.seed, self.low, self.high = options.seed, options.min_token_id, options.max_token_id
        self.blocks: dict[int, list[int]] = {}
        self.next_index = 0
        self.started_at: float | None = None
        self.finished = False
        self.lock = threading.Lock()

    def block(self, hash_id: int) -> list[int]:
        if hash_id not in self.blocks:
            rng = random.Random(self.seed * 1_000_003 + hash_id)
            self.blocks[hash_id] = [rng.randrange(self.low, self.high) for _ in range(self.block_tokens)]
        return self.blocks[hash_id]

    def job(self, record: TraceRecord, start: float) -> Job:
        prompt_len = min(self.max_prompt_tokens, max(1, round(record.input_length * self.length_scale)))
        prompt: list[int] = []
        for hash_id in record.hash_ids:
            if len(prompt) >= prompt_len:
                break
            prompt += self.block(hash_id)
        prompt = prompt[:prompt_len]
        if len(prompt) < prompt_len:  # a record whose hash ids cover less than its length
            prompt += TokenSource(self.seed + len(prompt), self.low, self.high).draw(prompt_len - len(prompt))
        output_len = min(self.max_output_tokens, max(1, round(record.output_length * self.length_scale)))
        return Job(output_len, prompt_ids=prompt, not_before=start + record.timestamp_ms / 1000 * self.time_scale)

    def next_job(self) -> Job | None:
        """The next request of the trace, or None once it has all been handed out."""
        with self.lock:
            if self.next_index >= len(self.records):
                return None
            record = self.records[self.next_index]
            self.next_index += 1
            if self.started_at is None:
                self.started_at = time.monotonic() - record.timestamp_ms / 1000 * self.time_scale
            return self.job(record, self.started_at)


class MooncakeWorkload:
    """One user's view of the shared `TraceReplay`."""

    def __init__(self, replay: TraceReplay) -> None:
        self.replay = replay

    def next_job(self) -> Job | None:
        return self.replay.next_job()

    def record_reply(self, text: str) -> None:
        pass


def make_workload(options, user_index: int, replay: TraceReplay | None):
    if options.shape == "fixed":
        return FixedWorkload(options, user_index)
    if options.shape == "random":
        return RandomWorkload(options, user_index)
    if options.shape == "chat":
        return ChatWorkload(options, user_index)
    if options.shape == "mooncake":
        assert replay is not None
        return MooncakeWorkload(replay)
    raise ValueError(f"unknown shape {options.shape!r}; choose one of {', '.join(SHAPES)}")
