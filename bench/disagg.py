"""The disaggregated platform against the single-process engine, under the same load, in one run.

    python bench/disagg.py [--model smollm2-135m-instruct | smollm2-moe] [--num-requests 32]
                           [--prompt-len 256] [--output-len 64] [--concurrency 8] [--repeats 3] [--quick]

Both platforms are started once with `cleave up`, each in its own temporary CLEAVE_HOME
on free ports of 127.0.0.1, with the same model folder (resolved in the default cache):
``--mode single`` (`cleave serve`, the engine inside, ``--num-threads 2``) and the default
disaggregated platform (Redis, KV store, 1 prefill and 2 decode workers, 2 expert
replicas for an MoE model, one torch thread per worker). Each round sends the same
streaming ``/v1/completions`` (a prompt of random token ids, greedy, ``ignore_eos``) to
one platform, ``--concurrency`` in flight, timing each SSE chunk as it arrives; rounds
alternate single, disaggregated, single, ... Every round draws new prompts, so no prefix
cache or KV store entry is reused; both platforms see the same prompts in the same round.
Figures are medians over rounds: TTFT p50 and p90, TPOT p50 (ms per output token after
the first, per request) and output tokens/s of the round, with ratios disaggregated / single."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from local_platform import Platform  # noqa: E402  (the tests' `cleave up` harness: own home, free ports)

SIDES = ("single", "disagg")
METRICS = (  # key, label, lower is better
    ("ttft_p50_ms", "TTFT p50 ms", True),
    ("ttft_p90_ms", "TTFT p90 ms", True),
    ("tpot_p50_ms", "TPOT p50 ms", True),
    ("tokens_per_s", "output tok/s", False),
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def make_prompts(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    # Ids from 100 up: clear of the special tokens at the bottom of the vocabulary.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size, (num, length), generator=generator).tolist()


async def stream_one(client: httpx.AsyncClient, platform: Platform, prompt: list[int], output_len: int) -> dict:
    """One streaming completion: seconds to the first token, to the last, tokens and cached prompt tokens."""
    body = {"model": platform.served_model_name, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 1}
    # logprobs: every chunk then names its tokens, even one whose text is held back (a partial
    # UTF-8 character), so token counts and first-token times are exact.
    started = time.perf_counter()
    first = last = None
    num_tokens, usage = 0, None
    async with client.stream("POST", f"{platform.base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if n := len((choice.get("logprobs") or {}).get("tokens", [])):
                    first = first if first is not None else now
                    last, num_tokens = now, num_tokens + n
    if usage is None or num_tokens != usage["completion_tokens"] or num_tokens != output_len:
        raise RuntimeError(f"expected {output_len} tokens, streamed {num_tokens}, usage {usage}")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"ttft": first - started, "decode_s": last - first, "num_tokens": num_tokens, "cached_tokens": cached}


async def run_round(platform: Platform, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    """All prompts through one platform, ``concurrency`` in flight; the round's figures."""
    queue = list(prompts)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:

        async def drain() -> None:
            while queue:
                results.append(await stream_one(client, platform, queue.pop(0), output_len))

        started = time.perf_counter()
        await asyncio.gather(*(drain() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ttfts = [r["ttft"] * 1e3 for r in results]
    tpots = [r["decode_s"] * 1e3 / (r["num_tokens"] - 1) for r in results if r["num_tokens"] > 1]
    return {"ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p90_ms": percentile(ttfts, 0.9),
            "tpot_p50_ms": percentile(tpots, 0.5) if tpots else float("nan"),
            "tokens_per_s": sum(r["num_tokens"] for r in results) / elapsed, "elapsed_s": elapsed,
            "cached_tokens": sum(r["cached_tokens"] for r in results)}


def measure(platforms: dict[str, Platform], args, vocab_size: int, concurrency: int, num_requests: int,
            seed: int) -> dict[str, list[dict]]:
    """Interleaved rounds (single, disagg, single, ...); fresh prompts each round, the same for both sides."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        prompts = make_prompts(vocab_size, num_requests, args.prompt_len, seed + repeat)
        for side in SIDES:
            run = asyncio.run(run_round(platforms[side], prompts, args.output_len, concurrency))
            runs[side].append(run)
            print(f"  c={concurrency} round {repeat + 1}/{args.repeats} {side}: {run['tokens_per_s']:.1f} tok/s, "
                  f"TTFT p50 {run['ttft_p50_ms']:.0f} ms, TPOT p50 {run['tpot_p50_ms']:.1f} ms, "
                  f"{run['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
    return runs


def start(side: str, platform: Platform) -> None:
    print(f"starting {side} ...", file=sys.stderr, flush=True)
    try:
        platform.up()
    except AssertionError as exc:
        raise RuntimeError(str(exc)) from None


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(args, rows: list[tuple[int, int, dict, dict]]) -> None:
    print(f"{args.model}, prompts of {args.prompt_len} random token ids, {args.output_len} output tokens "
          f"(greedy, ignore_eos), streaming /v1/completions; single: 1 process, 2 torch threads; disagg: the "
          f"default platform, 1 torch thread per worker; {os.cpu_count()} cores; median of {args.repeats} "
          f"interleaved rounds")
    print(f"{'concurrency':>11} | {'requests':>8} | {'metric':<13} | {'single':>8} | {'disagg':>8} | {'disagg/single':>13}")
    for concurrency, num_requests, single, disagg in rows:
        for key, label, _ in METRICS:
            print(f"{concurrency:>11} | {num_requests:>8} | {label:<13} | {single[key]:>8.1f} | {disagg[key]:>8.1f} | "
                  f"{disagg[key] / single[key]:>12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model-zoo name or model folder")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--latency-requests", type=int, default=8,
                        help="requests of the concurrency-1 row, one after another; 0 skips it")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per side; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 requests of 64+16 tokens, one round")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len, args.latency_requests, args.repeats = 8, 64, 16, 2, 1
    # `timeout` and `kill` send SIGTERM: unwind through the finally below, which stops both platforms.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cleave.modelzoo import registry

    model_dir = registry.resolve(args.model)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    name = Path(args.model).name
    platforms: dict[str, Platform] = {}
    with tempfile.TemporaryDirectory(prefix="cleave-bench-disagg-") as tmp:
        try:
            for side in SIDES:  # one after the other: each takes its free ports once the earlier holds its own
                flags = ["--mode", "single", "--num-threads", "2"] if side == "single" else ["--mode", "disaggregated"]
                platforms[side] = Platform(Path(tmp) / side, model_dir, *flags, served_model_name=name)
                start(side, platforms[side])
            for side in SIDES:
                warmup = make_prompts(vocab_size, 4, args.prompt_len, args.seed + 1_000_000)
                asyncio.run(run_round(platforms[side], warmup, 8, 2))
            loads = [(args.concurrency, args.num_requests)] + ([(1, args.latency_requests)] if args.latency_requests else [])
            rows, raw = [], []
            for i, (concurrency, num_requests) in enumerate(loads):
                runs = measure(platforms, args, vocab_size, concurrency, num_requests, args.seed + 1000 * i)
                rows.append((concurrency, num_requests, _median(runs["single"]), _median(runs["disagg"])))
                raw.append({"concurrency": concurrency, "num_requests": num_requests, **runs})
        finally:
            for side, platform in reversed(platforms.items()):
                print(f"stopping {side} ...", file=sys.stderr, flush=True)
                try:
                    platform.down()
                except Exception as exc:  # still stop the other one
                    print(f"stopping {side} failed: {exc}", file=sys.stderr)
    if any(run["cached_tokens"] for entry in raw for side in SIDES for run in entry[side]):
        print("warning: some prompt tokens came from a cache; rounds were not independent", file=sys.stderr)
    print_table(args, rows)
    if args.json:
        print(json.dumps(raw))


if __name__ == "__main__":
    main()
