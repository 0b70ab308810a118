"""Engine throughput and TTFT against transformers ``generate``, in one run.

    python bench/engine_throughput.py [--family mixtral] [--requests 64] [--output-len 32]

Both run the same seeded tiny checkpoint, float32, on this machine's CPU, with the
same prompts (random lengths), greedy, a fixed number of output tokens. Concurrency
1 runs requests one after another; concurrency 32 keeps 32 in flight (the engine
batches continuously; transformers runs static left-padded batches of 32, its best
case). Figures are printed as ratios engine / transformers."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def engine_run(model_dir: Path, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    from cleave.engine import SamplingParams
    from cleave.engine.config import EngineConfig
    from cleave.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=4096, max_num_seqs=max(concurrency, 1)))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.generate(prompts[:2], params)  # warm-up
    queue = list(enumerate(prompts))
    submitted: dict[str, float] = {}
    ttft: list[float] = []
    num_tokens = 0
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and len(engine.sequences) < concurrency:
            index, prompt = queue.pop(0)
            engine.add_request(str(index), prompt, params)
            submitted[str(index)] = time.perf_counter()
        for out in engine.step():
            if out.num_output_tokens == 1:
                ttft.append(time.perf_counter() - submitted[out.request_id])
            num_tokens += len(out.new_token_ids)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": num_tokens / elapsed, "ttft_mean_s": statistics.mean(ttft), "elapsed_s": elapsed}


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_run(model_dir: Path, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    ttft: list[float] = []
    num_tokens = 0
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), **kwargs)  # warm-up
        start = time.perf_counter()
        for batch_start in range(0, len(prompts), concurrency):
            batch = prompts[batch_start : batch_start + concurrency]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            clock = _FirstTokenClock()
            began = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, streamer=clock, **kwargs)
            ttft.extend([clock.first_token_at - began] * len(batch))
            num_tokens += (out.shape[1] - width) * len(batch)
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": num_tokens / elapsed, "ttft_mean_s": statistics.mean(ttft), "elapsed_s": elapsed}


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mixtral")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side; medians are reported")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from cleave.modelzoo import tiny

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.build(args.family, Path(tmp) / args.family, seed=0)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = [
            torch.randint(0, vocab, (int(torch.randint(16, 129, (1,), generator=generator)),), generator=generator).tolist()
            for _ in range(args.requests)
        ]
        rows = []
        for concurrency in (1, 32):
            # Interleaved repeats and medians: a busy neighbour on a small machine slows
            # whichever side runs at that moment, not one side systematically.
            runs = [(engine_run(model_dir, prompts, args.output_len, concurrency),
                     hf_run(model_dir, prompts, args.output_len, concurrency)) for _ in range(args.repeats)]
            rows.append((concurrency, _median([o for o, _ in runs]), _median([r for _, r in runs])))
    print(f"tiny {args.family}, {args.requests} requests, prompts 16-128 tokens, {args.output_len} output tokens, "
          f"{args.threads} threads, float32, median of {args.repeats} interleaved runs")
    print(f"{'concurrency':>11} | {'engine tok/s':>12} | {'hf tok/s':>9} | {'ratio':>6} | "
          f"{'engine TTFT ms':>14} | {'hf TTFT ms':>10} | {'ratio':>6}")
    for concurrency, ours, ref in rows:
        print(f"{concurrency:>11} | {ours['tokens_per_s']:>12.1f} | {ref['tokens_per_s']:>9.1f} | "
              f"{ours['tokens_per_s'] / ref['tokens_per_s']:>5.2f}x | {ours['ttft_mean_s'] * 1e3:>14.1f} | "
              f"{ref['ttft_mean_s'] * 1e3:>10.1f} | {ours['ttft_mean_s'] / ref['ttft_mean_s']:>5.2f}x")
    if args.json:
        print(json.dumps([{"concurrency": c, "engine": o, "transformers": r} for c, o, r in rows]))


if __name__ == "__main__":
    main()
