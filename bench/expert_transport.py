"""Expert calls over the replica's stream against the same calls over gRPC, in one run.

    python bench/expert_transport.py [--model tiny-mixtral-hd64] [--calls 1000] [--rounds 3]

One real replica process (``python -m cleave.expert``, standalone: no Redis, whole model)
serves both transports; the caller is this process's ``RemoteExpertBackend``, as in a
decode worker, given the replica once with its gRPC address only and once with its stream
address too. Each measurement is ``--calls`` forward passes of one MoE layer for a batch
of T tokens (random hidden states, top-k of random router weights), after a warm-up. Two
layouts: ``split``, caller and replica pinned to cores of their own, and ``shared``, both on
one core, as ``cleave up``'s processes are in bench/peer_vllm.py. Rounds alternate gRPC and
stream; each figure is the median over rounds: wall time per call, and CPU per call of the
caller (this process, all its threads) and of the replica (``/proc/<pid>/stat``). Ratios
are stream / gRPC: below 1x is cheaper."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    from cleave.launcher import port_in_use, wait_until

    if not wait_until(lambda: proc.poll() is not None or port_in_use("127.0.0.1", port), timeout, 0.05):
        raise SystemExit("the replica did not start listening")
    if proc.poll() is not None:
        raise SystemExit(f"the replica exited with {proc.returncode}")


def measure(backend, layer: int, hidden, ids, weights, calls: int, replica_pid: int) -> dict[str, float]:
    for _ in range(max(20, calls // 20)):
        backend.forward(layer, hidden, ids, weights)
    wall, cpu, replica = time.perf_counter(), time.process_time(), process_cpu(replica_pid)
    for _ in range(calls):
        backend.forward(layer, hidden, ids, weights)
    return {
        "wall_ms": (time.perf_counter() - wall) * 1e3 / calls,
        "caller_cpu_ms": (time.process_time() - cpu) * 1e3 / calls,
        "replica_cpu_ms": (process_cpu(replica_pid) - replica) * 1e3 / calls,
    }


def run_layout(args, model_dir, config, layout: str, cores: list[int]) -> list[tuple]:
    from cleave.expert.client import RemoteExpertBackend, Replica

    caller_core, replica_core = (cores[0], cores[0]) if layout == "shared" else (cores[0], cores[1])
    os.sched_setaffinity(0, {caller_core})
    port, stream_port = free_port(), free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", str(replica_core), sys.executable, "-m", "cleave.expert", "--model", str(model_dir),
         "--port", str(port), "--stream-port", str(stream_port), "--metrics-port", "-1", "--redis-url", "",
         "--num-threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        wait_for_port(stream_port, proc)
        wait_for_port(port, proc)
        pairs = frozenset((layer, e) for layer in config.moe_layers for e in range(config.num_experts))
        backends = {
            "grpc": RemoteExpertBackend([Replica(f"127.0.0.1:{port}", pairs)], timeout=30),
            "stream": RemoteExpertBackend([Replica(f"127.0.0.1:{port}", pairs, "", f"127.0.0.1:{stream_port}")], timeout=30),
        }
        layer = min(config.moe_layers)
        for tokens in args.tokens:
            generator = torch.Generator().manual_seed(tokens)
            hidden = torch.randn(tokens, config.hidden_size, generator=generator)
            weights, ids = torch.topk(torch.rand(tokens, config.num_experts, generator=generator).softmax(-1),
                                      config.num_experts_per_tok, dim=-1)
            calls = max(50, args.calls // max(1, tokens // 8))
            results = {"grpc": [], "stream": []}
            for _ in range(args.rounds):
                for name, backend in backends.items():
                    results[name].append(measure(backend, layer, hidden, ids, weights, calls, proc.pid))
            median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                      for name, runs in results.items()}
            for key in ("wall_ms", "caller_cpu_ms", "replica_cpu_ms"):
                grpc_value, stream_value = median["grpc"][key], median["stream"][key]
                rows.append((layout, tokens, calls, key, grpc_value, stream_value, stream_value / grpc_value))
            print(f"  {layout} T={tokens}: wall {median['grpc']['wall_ms']:.3f} -> {median['stream']['wall_ms']:.3f} ms",
                  file=sys.stderr, flush=True)
        for backend in backends.values():
            backend.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mixtral-hd64", help="model-zoo name or MoE model folder")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512], help="tokens per call")
    parser.add_argument("--calls", type=int, default=1000, help="calls per measurement for 8 tokens or fewer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", default="split,shared", help="split (a core each), shared (one core)")
    args = parser.parse_args()

    from cleave.models.config import ModelConfig
    from cleave.modelzoo import registry

    model_dir = registry.resolve(args.model)
    config = ModelConfig.from_pretrained(model_dir)
    if not config.is_moe:
        raise SystemExit(f"{args.model} is not a Mixture-of-Experts model")
    cores = sorted(os.sched_getaffinity(0))
    layouts = args.layouts.split(",")
    if "split" in layouts and len(cores) < 2:
        raise SystemExit("the split layout needs two cores")
    torch.set_num_threads(1)
    print(f"model {args.model}: hidden {config.hidden_size}, {config.num_experts} experts top-{config.num_experts_per_tok}; "
          f"cores {cores}; {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = []
    for layout in layouts:
        rows += run_layout(args, model_dir, config, layout, cores)
    print("| layout | tokens/call | calls | metric | gRPC | stream | stream/gRPC |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for layout, tokens, calls, key, grpc_value, stream_value, ratio in rows:
        print(f"| {layout} | {tokens} | {calls} | {key.replace('_ms', ' ms')} | {grpc_value:.3f} | {stream_value:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
