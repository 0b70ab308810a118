"""The LLM step of a diagnosis: any OpenAI-compatible chat endpoint investigates the
statistical candidates and names the root cause.

The exchange is plain JSON in the message content, not the tools API, so that any
endpoint that chats can take part (the platform's own small model included). The LLM
answers either ``{"query": "<PromQL>"}`` (at most ``max_queries`` times; the agent runs it
and sends the result back) or its verdict ``{"root_cause": "<candidate>", "metric": "...",
"explanation": "..."}``. The verdict is accepted only when it names one of the candidates
and explains itself; anything else, and any failure to get an answer, leaves the
statistical ranking standing, with the reason recorded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import httpx

DEFAULT_LLM_URL = "http://127.0.0.1:8000/v1"

SYSTEM = """You are the ops agent of Cleave, an LLM serving platform (router, prefill and decode \
workers, KV stores, expert replicas, Redis). A latency or error anomaly happened. Statistics ranked \
candidate root-cause components; you must pick the root cause AMONG THE CANDIDATES ONLY.
Reply with one JSON object and nothing else:
- to look at more data first: {"query": "<one PromQL expression>"} (at most %d such queries)
- to conclude: {"root_cause": "<candidate component>", "metric": "<its metric that shows it>", \
"explanation": "<two or three sentences citing the evidence>"}"""


class LlmUnusable(Exception):
    """The LLM gave no usable verdict; the message is the reason the report shows."""


@dataclass(slots=True)
class LlmConfig:
    url: str = DEFAULT_LLM_URL
    model: str = ""  # empty: the first model the endpoint lists
    api_key: str = ""
    timeout_seconds: float = 60.0
    max_tokens: int = 300
    max_queries: int = 2


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (code fences and chatter around it allowed)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def validate_verdict(answer: dict[str, Any], candidates: list[str]) -> dict[str, Any]:
    """The verdict as the report keeps it, or ``LlmUnusable`` saying what is wrong."""
    component = answer.get("root_cause")
    if not isinstance(component, str) or not component.strip():
        raise LlmUnusable(f"the answer names no root_cause: {json.dumps(answer)[:200]}")
    if component.strip() not in candidates:
        raise LlmUnusable(f"the answer names {component.strip()!r}, which is not among the candidates "
                          f"({', '.join(candidates)})")
    explanation = answer.get("explanation")
    if not isinstance(explanation, str) or not explanation.strip():
        raise LlmUnusable("the answer has no explanation")
    metric = answer.get("metric")
    return {"component": component.strip(), "metric": metric if isinstance(metric, str) else None,
            "explanation": explanation.strip()[:2000]}


class ChatClient:
    """``POST {url}/chat/completions`` with greedy decoding; errors become ``LlmUnusable``."""

    def __init__(self, config: LlmConfig) -> None:
        self.config = config
        self.url = config.url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.model = config.model

    def _post_or_get(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        try:
            response = httpx.request(method, f"{self.url}{path}", json=body, headers=self.headers,
                                     timeout=self.config.timeout_seconds)
        except httpx.TimeoutException:
            raise LlmUnusable(f"the LLM at {self.url} timed out after {self.config.timeout_seconds:g} s") from None
        except httpx.HTTPError as exc:
            raise LlmUnusable(f"the LLM at {self.url} cannot be reached: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise LlmUnusable(f"the LLM at {self.url} answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise LlmUnusable(f"the LLM at {self.url} answered something that is not JSON: {response.text[:200]!r}") from None

    def resolve_model(self) -> str:
        if not self.model:
            listed = self._post_or_get("GET", "/models").get("data") or []
            if not listed or not isinstance(listed[0], dict) or not listed[0].get("id"):
                raise LlmUnusable(f"the LLM at {self.url} lists no model; pass --llm-model")
            self.model = str(listed[0]["id"])
        return self.model

    def chat(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.resolve_model(), "messages": messages, "temperature": 0,
                "max_tokens": self.config.max_tokens}
        reply = self._post_or_get("POST", "/chat/completions", body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LlmUnusable(f"the LLM's reply has no message: {json.dumps(reply)[:200]}") from None
        if not isinstance(content, str):
            raise LlmUnusable("the LLM's message has no text content")
        return content


def investigate(config: LlmConfig, brief: str, candidates: list[str],
                run_query: Callable[[str], str]) -> dict[str, Any]:
    """The report's ``llm`` section: ``used``, ``url``, ``model``, ``accepted``, ``verdict``,
    ``reason`` (why not accepted), ``queries`` (the PromQL the LLM ran and what it got)."""
    client = ChatClient(config)
    section: dict[str, Any] = {"used": True, "url": client.url, "model": config.model or None, "accepted": False,
                               "verdict": None, "reason": None, "queries": []}
    messages = [{"role": "system", "content": SYSTEM % config.max_queries}, {"role": "user", "content": brief}]
    try:
        for _ in range(config.max_queries + 1):
            content = client.chat(messages)
            section["model"] = client.model
            answer = first_json_object(content)
            if answer is None:
                raise LlmUnusable(f"the answer is not a JSON object: {content.strip()[:160]!r}")
            query = answer.get("query")
            if query is None or "root_cause" in answer:
                section["verdict"] = validate_verdict(answer, candidates)
                section["accepted"] = True
                return section
            if not isinstance(query, str) or len(section["queries"]) >= config.max_queries:
                raise LlmUnusable(f"the LLM asked for more than {config.max_queries} queries without concluding")
            result = run_query(query)
            section["queries"].append({"promql": query, "result": result})
            messages += [{"role": "assistant", "content": content},
                         {"role": "user", "content": f"Result of {query}:\n{result}\nConclude or query again."}]
        raise LlmUnusable(f"the LLM asked for more than {config.max_queries} queries without concluding")
    except LlmUnusable as exc:
        section["reason"] = str(exc)
        section["model"] = client.model or None
        return section
