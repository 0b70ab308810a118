"""The engine under a burst: every request at once, against an older commit, in one run.

    python bench/engine_load.py [--model smollm2-moe] [--baseline REV] [--repeats 3]
        [--config FIELD=VALUE] [--variant FIELD=VALUE]

``--requests`` prompts of ``--input-len`` random token ids are all added to one
`LLMEngine` at time zero and run to ``--output-len`` greedy tokens each (``ignore_eos``),
as ``vllm bench serve --request-rate inf`` sends them, without the HTTP layer. Per
request: TTFT = first token - time zero; TPOT = (last token - first token) / (tokens - 1).
Output tokens/s = all output tokens / time to the last one.

The baseline is the engine at git revision ``--baseline``, checked out into a temporary
worktree; each side runs in a fresh process (the baseline's with that worktree's
``services/`` first on ``PYTHONPATH``), sides alternate, and medians are reported, so a
busy neighbour slows whichever side runs at that moment rather than one side. Ratios are
new / baseline: below 1x is faster for latencies, above 1x is more tokens/s. ``--config``
sets an `EngineConfig` field on this tree's side; each ``--variant`` adds a side of this
tree with one more field set. Every side must produce the same tokens; a warning says
when they do not."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METRICS = [
    ("output_tok_s", "output tok/s", 1),
    ("ttft_mean_s", "TTFT mean ms", 1e3),
    ("ttft_p99_s", "TTFT p99 ms", 1e3),
    ("tpot_mean_s", "TPOT mean ms", 1e3),
    ("tpot_p99_s", "TPOT p99 ms", 1e3),
    ("step_max_s", "longest step ms", 1e3),
    ("cpu_tok_s", "tok/CPU-second", 1),
]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    rank = 0.99 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def burst(args: argparse.Namespace) -> dict:
    """One burst on the engine importable here (this tree's or the baseline's)."""
    import torch

    from cleave.engine import SamplingParams
    from cleave.engine.config import EngineConfig
    from cleave.engine.llm_engine import LLMEngine
    from cleave.modelzoo import registry

    model_dir = registry.resolve(args.model)
    overrides = {key: int(value) if value.lstrip("-").isdigit() else value
                 for key, _, value in (item.partition("=") for item in args.config)}
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_threads=args.threads, **overrides))
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, vocab, (args.input_len,), generator=generator).tolist() for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engine.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    times: dict[str, list[float]] = {str(i): [] for i in range(len(prompts))}
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    steps: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    while engine.has_unfinished():
        began = time.perf_counter()
        step_outputs = engine.step()
        now = time.perf_counter()
        steps.append(now - began)
        for out in step_outputs:
            times[out.request_id].extend([now] * len(out.new_token_ids))
            outputs[out.request_id].extend(out.new_token_ids)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ttft = [t[0] - start for t in times.values()]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    return {
        "output_tok_s": sum(map(len, times.values())) / elapsed,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p99_s": _p99(ttft),
        "tpot_mean_s": statistics.mean(tpot),
        "tpot_p99_s": _p99(tpot),
        "step_max_s": max(steps),
        # Output tokens per second of this process's own CPU time: on a machine shared with
        # other work, wall-clock figures carry the neighbours' load; this one mostly does not.
        "cpu_tok_s": sum(map(len, times.values())) / cpu,
        "num_steps": len(steps),
        "elapsed_s": elapsed,
        # Both sides must produce the same tokens: a speed-up that changes outputs is a bug.
        "outputs_digest": hash(tuple(tuple(outputs[str(i)]) for i in range(len(prompts)))),
    }


def _side_command(args: argparse.Namespace, config: list[str]) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model,
               "--requests", str(args.requests), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--threads", str(args.threads), "--seed", str(args.seed)]
    command += [f"--config={item}" for item in config]
    return (["taskset", "-c", args.cpu] if args.cpu else []) + command


def _run_side(args: argparse.Namespace, services: Path, config: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(services), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(_side_command(args, config), env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"a burst under {services} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key, _, _ in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-moe", help="a model name of `cleave model list`")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default="", help="git revision to compare with; empty: this tree alone")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side; medians are reported")
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                        help="an EngineConfig field for the new side (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE",
                        help="also run this tree with this EngineConfig field set, as a third side (repeatable)")
    parser.add_argument("--cpu", default="", help="pin each burst to these cores (taskset -c)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(burst(args)))
        return

    sides = {"new": (REPO / "services", args.config)}
    for item in args.variant:
        sides[item] = (REPO / "services", [*args.config, item])
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.baseline],
                           check=True)
            sides = {"baseline": (worktree / "services", []), **sides}
        try:
            runs: dict[str, list[dict]] = {name: [] for name in sides}
            for repeat in range(args.repeats):
                for name, (services, config) in sides.items():
                    runs[name].append(_run_side(args, services, config))
                    run = runs[name][-1]
                    print(f"run {repeat + 1} {name}: {run['output_tok_s']:.1f} tok/s, TTFT mean "
                          f"{run['ttft_mean_s'] * 1e3:.0f} ms, TPOT mean {run['tpot_mean_s'] * 1e3:.0f} ms, "
                          f"{run['num_steps']} steps", file=sys.stderr, flush=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    digests = {name: {run["outputs_digest"] for run in side} for name, side in runs.items()}
    print(f"{args.model}, {args.requests} requests of {args.input_len} random tokens at once, {args.output_len} "
          f"greedy output tokens each, {args.threads} torch thread(s), median of {args.repeats} alternating runs")
    if len({d for ds in digests.values() for d in ds}) > 1:
        print(f"WARNING: the sides' output tokens differ: {digests}")
    medians = {name: _median(side) for name, side in runs.items()}
    names = list(sides)
    width = max(9, *map(len, names))
    header = f"{'metric':<16} | " + " | ".join(f"{name:>{width}}" for name in names)
    if args.baseline:
        header += f" | {'new/baseline':>12}"
    print(header)
    for key, label, scale in METRICS:
        row = f"{label:<16} | " + " | ".join(f"{medians[name][key] * scale:>{width}.1f}" for name in names)
        if args.baseline:
            row += f" | {medians['new'][key] / medians['baseline'][key]:>11.2f}x"
        print(row)
    if args.json:
        print(json.dumps(runs))


if __name__ == "__main__":
    main()
