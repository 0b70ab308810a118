"""Cleave against vLLM's CPU build on the same seeded tiny MoE checkpoint, driven by vLLM's own client and by our Locust file.

    python bench/peer_vllm.py [--model tiny-mixtral-hd64] [--shapes single,disagg[,disagg-remote,...]] [--num-prompts 50]
                              [--input-len 128] [--output-len 32] [--locust-users 8] [--locust-time 30]
                              [--server-core 1] [--client-core 0] [--disagg-flags "..."]
                              [--request-rates 20,30] [--rate-prompts 300] [--repeat 3]

Needs vLLM's CPU build in .venv-vllm/ (``infra/scripts/vllm.sh install``). In one run, one
server at a time (so no two servers share the cores): vLLM (``vllm serve``), then Cleave
single-process (``cleave up --mode single --num-threads 1``), then Cleave disaggregated
(``cleave up`` defaults, which size the pools to the one server core: Redis, a KV store,
1 prefill and 1 decode worker running their experts themselves, the router; 1 torch thread
per worker; and, on one core, conditional disaggregation: a prompt of up to one step's
tokens, 1024, is prefilled by the decode worker itself; ``--disagg-flags "--decode-workers
2 --expert-replicas 2"`` runs the two-core layout on it), and, where ``--shapes`` names it,
``disagg-remote``: the same with every prompt prefilled on the prefill worker and handed
over through the store (``--local-prefill-tokens 0``, the default on more cores),
``disagg-replica``: the same with one expert replica (``--expert-replicas 1``), which shows
what the expert hop costs, and ``disagg-local``: conditional disaggregation at
``--local-prefill-tokens 256`` (the shape of runs Q–Z; on one core the default, 1024,
sends these prompts the same way). Each server runs under ``taskset -c SERVER_CORE``
(every process it spawns inherits that mask) and each client under ``taskset -c
CLIENT_CORE``: on a 2-core machine the server has core 1 and the client core 0.

Every server is driven, after a short warm-up, by ``vllm bench serve`` (OpenAI
``/v1/completions``, streaming; random dataset, ``--input-len`` in / ``--output-len`` out,
``--num-prompts`` prompts, temperature 0, ``--ignore-eos``) at concurrency 1, then with all
prompts at once (unbounded request rate, no concurrency cap), then at each of
``--request-rates`` (``--rate-prompts`` prompts arriving as a Poisson process at that
rate: the same offered load for every server); then by a headless run of
loadtest/locustfile.py (``--shape fixed`` at the same lengths, ``--locust-users`` users for
``--locust-time`` seconds). The figures: output tokens/s, mean/p99 TTFT and TPOT (Locust:
also the gap between streamed chunks, ITL, and the tokens per chunk; its percentiles rounded
as Locust rounds them), and the ratios
Cleave/vLLM. A stage that fails is reported and left blank; the others still run.

This VM's figures move by a fifth from run to run, vLLM's as much as ours, so one run
cannot settle a ratio near 1: ``--repeat N`` runs every server N times in turn (every
other round in reverse order) and prints, per figure, the median over the rounds and, per
ratio, the median of the rounds' ratios (each against the vLLM of the same round) with
the lowest and highest.

Each stage also reads the CPU time (``utime + stime`` in ``/proc``) of every process pinned
to the server core before and after, and prints it per output token, by process kind
(``cpu ms/token`` rows; for Cleave the role: ``decode``, ``expert``, ``router``...): where
a server spends its core, with nothing but the server on it.

The default model is tiny-mixtral-hd64 (2 layers, hidden 256, 4 heads of 64, 8 experts
top-2): vLLM 0.32's CPU attention has no kernel for tiny-mixtral's head_dim of 16
("Unsupported CPU attention configuration: head_dim=16"). ``--model smollm2-moe`` runs the
larger Mixtral made from SmolLM2 (30 layers, 4 experts)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from local_platform import Platform, free_port  # noqa: E402  (the tests' `cleave up` harness: own home, free ports)

VENV = Path(os.environ.get("CLEAVE_VLLM_VENV", ROOT / ".venv-vllm"))
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
VLLM = VENV / "bin" / "vllm"
METRICS = (  # result key, label, lower is better
    ("output_throughput", "output tok/s", False),
    ("mean_ttft_ms", "TTFT mean ms", True),
    ("p99_ttft_ms", "TTFT p99 ms", True),
    ("mean_tpot_ms", "TPOT mean ms", True),
    ("p99_tpot_ms", "TPOT p99 ms", True),
)
LOADS = (("c=1", ["--max-concurrency", "1", "--request-rate", "inf"]),
         ("unbounded", ["--request-rate", "inf"]))
LOCUST_METRICS = (  # the same keys, as Locust measures them, and its gaps between chunks
    ("output_throughput", "output tok/s", False),
    ("mean_ttft_ms", "TTFT mean ms", True),
    ("p99_ttft_ms", "TTFT p99 ms", True),
    ("mean_tpot_ms", "TPOT mean ms", True),
    ("p99_tpot_ms", "TPOT p99 ms", True),
    ("mean_itl_ms", "ITL mean ms", True),
    ("p99_itl_ms", "ITL p99 ms", True),
    ("tokens_per_chunk", "tokens per chunk", False),
    ("completed", "requests", False),
)


def loads(args) -> list[tuple[str, list[str], int]]:
    """Each `vllm bench serve` stage: its label, its load flags and its number of prompts.
    ``--request-rates`` adds stages at a fixed offered load (Poisson arrivals): Locust's
    users are a closed loop, so a server that serves more requests also queues more of
    them, and latencies compare fairly only at the same offered load."""
    rates = [r.strip() for r in args.request_rates.split(",") if r.strip()]
    return ([(label, load, args.num_prompts) for label, load in LOADS]
            + [(f"rate {r}/s", ["--request-rate", r], args.rate_prompts) for r in rates])


ROLES = ("router", "prefill", "decode", "expert", "kvstore", "serve")


def _kind(cmdline: list[str]) -> str:
    """What a server process is, for the CPU rows: a Cleave role, ``vllm``, ``redis``..."""
    for i, word in enumerate(cmdline[:-1]):
        if word == "cleave.cli" and cmdline[i + 1] in ROLES:
            return cmdline[i + 1]
    text = " ".join(cmdline).lower()  # vLLM's engine core retitles itself VLLM::EngineCore
    return next((k for k in ("vllm", "redis", "tansu", "prometheus") if k in text), "other")


def server_cpu(core: str) -> dict[str, float]:
    """CPU seconds so far of every process pinned to exactly ``core`` (the server and all
    it spawned, which inherit its taskset mask), summed by kind (:func:`_kind`)."""
    wanted = set()
    for part in core.split(","):
        first, _, last = part.partition("-")
        wanted.update(range(int(first), int(last or first) + 1))
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.sched_getaffinity(int(entry.name)) != wanted:
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
        if not cmdline[0]:
            continue  # a kernel thread bound to the core
        fields = stat[stat.rindex(")") + 2:].split()
        kind = _kind(cmdline)
        totals[kind] = totals.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Milliseconds of server CPU per output token between two :func:`server_cpu` reads,
    by kind and ``total``."""
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    per = {k: 1000 * v / tokens for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"total": sum(per.values()), **per} if tokens else {}


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


class VllmServer:
    def __init__(self, model_dir: Path, name: str, core: str, log: Path, max_model_len: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.argv = ["taskset", "-c", core, str(VLLM), "serve", str(model_dir), "--served-model-name", name,
                     "--host", "127.0.0.1", "--port", str(self.port), "--gpu-memory-utilization", "0.3",
                     "--dtype", "float32", "--max-model-len", str(max_model_len), "--max-num-seqs", "64",
                     "--enforce-eager", "--disable-log-stats"]
        # The CPU backend binds its OpenMP threads itself: to the server's core, one thread;
        # 1 GiB of KV cache is ample for this model.
        self.env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": core, "VLLM_CPU_KVCACHE_SPACE": "1",
                    "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "VLLM_TARGET_DEVICE": "cpu"}
        self.proc: subprocess.Popen | None = None

    def up(self, timeout: float) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_ready(f"{self.base_url}/v1/models", self.proc, timeout, self.log)

    def down(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the API server and its engine core
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class PinnedPlatform(Platform):
    """`cleave up` under taskset: the launcher and every process it starts keep the mask."""

    def __init__(self, *args, core: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.core = core

    def up(self, timeout: float = 600) -> None:
        result = subprocess.run(["taskset", "-c", self.core, sys.executable, "-m", "cleave.cli", "up", *self.flags],
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"cleave up failed:\n{result.stdout}\n{result.stderr}\n{self.logs()}")


def bench_serve(base_url: str, name: str, model_dir: Path, args, load: list[str], num_prompts: int,
                result_dir: Path, tag: str, seed: int) -> dict:
    filename = f"{tag}.json"
    argv = ["taskset", "-c", args.client_core, str(VLLM), "bench", "serve", "--backend", "openai",
            "--base-url", base_url, "--endpoint", "/v1/completions", "--model", name, "--served-model-name", name,
            "--tokenizer", str(model_dir), "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts), "--temperature", "0",
            "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result_dir),
            "--result-filename", filename, *load]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.client_timeout)
    if result.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")
    data = json.loads((result_dir / filename).read_text())
    if data.get("completed") != num_prompts:
        raise RuntimeError(f"{tag}: {data.get('completed')} of {num_prompts} requests completed:\n"
                           f"{result.stdout[-3000:]}")
    return data


def locust_run(base_url: str, name: str, args, result_dir: Path, tag: str, vocab_size: int) -> dict:
    """loadtest/locustfile.py headless, fixed lengths; its figures under bench serve's keys."""
    prefix = result_dir / tag
    argv = ["taskset", "-c", args.client_core, sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--only-summary", "-H", base_url, "-u", str(args.locust_users), "-r", str(args.locust_users),
            "-t", f"{args.locust_time}s", "--stop-timeout", "60", "--csv", str(prefix), "--shape", "fixed",
            "--model", name, "--prompt-tokens", str(args.input_len), "--output-tokens", str(args.output_len),
            "--max-token-id", str(vocab_size), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.locust_time + 180)
    try:
        with open(f"{prefix}_stats.csv") as stats:
            rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
        with open(f"{prefix}_tokens.csv") as tokens:
            (tally,) = [row for row in csv.DictReader(tokens) if row["Name"] == "fixed"]
        ttft, itl, e2e = rows[("TTFT", "fixed")], rows[("ITL", "fixed")], rows[("E2E", "fixed")]
        tpot = rows[("TPOT", "fixed")]
    except (OSError, KeyError, ValueError) as exc:
        raise RuntimeError(f"locust ({result.returncode}) left no statistics ({exc}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}") from exc
    failures = int(rows[("", "Aggregated")]["Failure Count"])
    if result.returncode != 0 or failures:
        raise RuntimeError(f"locust exited {result.returncode} with {failures} failures:\n{result.stderr[-3000:]}")
    return {"output_throughput": float(tally["Output Tokens/s"]),
            "mean_ttft_ms": float(ttft["Average Response Time"]), "p99_ttft_ms": float(ttft["99%"]),
            "mean_tpot_ms": float(tpot["Average Response Time"]), "p99_tpot_ms": float(tpot["99%"]),
            "mean_itl_ms": float(itl["Average Response Time"]), "p99_itl_ms": float(itl["99%"]),
            # Every request's first chunk is its TTFT, each later one an ITL gap.
            "tokens_per_chunk": int(tally["Output Tokens"]) / (int(itl["Request Count"]) + int(e2e["Request Count"])),
            "completed": int(e2e["Request Count"]), "total_output_tokens": int(tally["Output Tokens"])}


def drive(side: str, base_url: str, name: str, model_dir: Path, args, result_dir: Path, vocab_size: int,
          errors: list[str]) -> dict[str, dict]:
    bench_serve(base_url, name, model_dir, args, ["--max-concurrency", "2"], 4, result_dir, f"{side}-warmup",
                args.seed + 1000)
    stages = [(label, lambda load=load, label=label, count=count: bench_serve(
        base_url, name, model_dir, args, load, count, result_dir, f"{side}-{label.replace('/', '')}", args.seed))
        for label, load, count in loads(args)]
    if args.locust_time > 0:
        stages.append(("locust", lambda: locust_run(base_url, name, args, result_dir, f"{side}-locust", vocab_size)))
    figures = {}
    for label, stage in stages:
        started = time.monotonic()
        print(f"  {side} {label} ...", file=sys.stderr, flush=True)
        cpu_before = server_cpu(args.server_core)
        try:
            f = figures[label] = stage()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{side} {label}: {exc}")
            print(f"  {side} {label} FAILED: {str(exc)[:2000]}", file=sys.stderr, flush=True)
            continue
        f["cpu_ms_per_token"] = cpu_per_token(cpu_before, server_cpu(args.server_core),
                                              int(f.get("total_output_tokens") or 0))
        print(f"  {side} {label}: {f['output_throughput']:.1f} tok/s, TTFT mean {f['mean_ttft_ms']:.1f} ms, "
              f"TPOT mean {f['mean_tpot_ms']:.2f} ms, server CPU {f['cpu_ms_per_token'].get('total', 0):.2f} "
              f"ms/token ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    return figures


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# `cleave up` flags of each Cleave shape; --disagg-flags go after the disaggregated ones.
SHAPE_FLAGS = {
    "single": ["--mode", "single", "--num-threads", "1"],
    "disagg": ["--mode", "disaggregated"],
    "disagg-replica": ["--mode", "disaggregated", "--expert-replicas", "1"],
    "disagg-local": ["--mode", "disaggregated", "--local-prefill-tokens", "256"],
    "disagg-remote": ["--mode", "disaggregated", "--local-prefill-tokens", "0"],
}


def run_side(side: str, args, model_dir: Path, name: str, config: dict, max_model_len: int, tmp_path: Path,
             errors: list[str]) -> dict[str, dict] | None:
    """Start one server on the server core, drive it through every stage, stop it."""
    print(f"starting {side} ...", file=sys.stderr, flush=True)
    if side == "vllm":
        server = VllmServer(model_dir, name, args.server_core, tmp_path / "vllm.log", max_model_len)
    else:
        flags = SHAPE_FLAGS[side] + ([] if side == "single" else shlex.split(args.disagg_flags))
        server = PinnedPlatform(tmp_path / side, model_dir, *flags, served_model_name=name, core=args.server_core)
    try:
        server.up(args.server_timeout)
        return drive(side, server.base_url, name, model_dir, args, tmp_path, config["vocab_size"], errors)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        errors.append(f"{side}: {exc}")
        print(f"{side} FAILED: {str(exc)[:3000]}", file=sys.stderr, flush=True)
        return None
    finally:
        print(f"stopping {side} ...", file=sys.stderr, flush=True)
        try:
            server.down()
        except Exception as exc:  # noqa: BLE001  (report, then go on to the next server)
            print(f"stopping {side} failed: {exc}", file=sys.stderr)


def _figure(results: dict, side: str, label: str, key: str, cpu: bool = False) -> float | None:
    figures = results.get(side, {}).get(label, {})
    return figures.get("cpu_ms_per_token", {}).get(key) if cpu else figures.get(key)


def print_table(args, sides: list[str], rounds: list[dict[str, dict[str, dict]]], header: list[str]) -> None:
    """One round: its figures and ratios. Several: the median of each figure over the rounds,
    and the median of the ratios each round gives (each Cleave server against the vLLM of the
    same round), with their lowest and highest."""
    cleave_sides = [s for s in sides if s != "vllm"]
    for line in header:
        print(line)
    print(f"{args.model}: `vllm bench serve` random {args.input_len} in / {args.output_len} out, "
          f"{args.num_prompts} prompts, temperature 0, ignore_eos; Locust fixed {args.input_len}/{args.output_len}, "
          f"{args.locust_users} users, {args.locust_time} s; servers on core {args.server_core}, "
          f"client on core {args.client_core}; {os.cpu_count()} cores"
          + (f"; medians of {len(rounds)} rounds, ratios as median (lowest-highest)" if len(rounds) > 1 else ""))
    print("| load | metric | " + " | ".join(sides) + "".join(f" | {s}/vllm" for s in cleave_sides) + " |")
    print("| --- | --- |" + " ---: |" * (len(sides) + len(cleave_sides)))

    def row(label: str, metric: str, key: str, cpu: bool, with_ratio: bool) -> str:
        cells = []
        for s in sides:
            values = [v for r in rounds if (v := _figure(r, s, label, key, cpu)) is not None]
            cells.append(_cell(statistics.median(values) if values else None))
        for s in cleave_sides:
            if not with_ratio:
                cells.append("")
                continue
            ratios = [c / v for r in rounds
                      if (c := _figure(r, s, label, key, cpu)) is not None and (v := _figure(r, "vllm", label, key, cpu))]
            if not ratios:
                cells.append("n/a")
            elif len(ratios) == 1:
                cells.append(f"{ratios[0]:.2f}x")
            else:
                cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        return f"| {label} | {metric} | " + " | ".join(cells) + " |"

    stages = [(label, METRICS) for label, _, _ in loads(args)]
    stages += [("locust", LOCUST_METRICS)] if args.locust_time > 0 else []
    for label, metrics in stages:
        for key, metric, _ in metrics:
            print(row(label, metric, key, False, True))
        kinds = dict.fromkeys(k for r in rounds for s in sides for k in r.get(s, {}).get(label, {}).get(
            "cpu_ms_per_token", {}))
        for kind in kinds:
            print(row(label, f"cpu ms/token: {kind}", kind, True, kind == "total"))


def git_commit() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mixtral-hd64", help="model-zoo name or model folder")
    parser.add_argument("--shapes", default="single,disagg",
                        help="Cleave shapes, comma-separated: single, disagg, disagg-remote, disagg-replica, disagg-local")
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--server-core", default="1", help="taskset core list of each server in turn")
    parser.add_argument("--client-core", default="0", help="taskset core list of `vllm bench serve` and Locust")
    parser.add_argument("--locust-users", type=int, default=8, help="Locust users (each one request at a time)")
    parser.add_argument("--locust-time", type=int, default=30, help="seconds of Locust per server; 0 skips it")
    parser.add_argument("--request-rates", default="",
                        help="comma-separated requests/s: more `vllm bench serve` stages at that offered load")
    parser.add_argument("--rate-prompts", type=int, default=300, help="prompts of each --request-rates stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-timeout", type=float, default=600, help="seconds for a server to come up")
    parser.add_argument("--client-timeout", type=float, default=900, help="seconds for one `vllm bench serve`")
    parser.add_argument("--disagg-flags", default="",
                        help="more `cleave up` flags for the disagg shape, e.g. \"--decode-workers 1\"")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every server in turn (every other round in reverse order); more than 1 "
                             "prints the medians and each ratio's median, lowest and highest over the rounds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too (a list, one per round, "
                                                            "with --repeat)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    if not VLLM.exists():
        sys.exit(f"{VLLM} is missing: run infra/scripts/vllm.sh install")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally blocks
    from cleave.modelzoo import registry

    model_dir = registry.resolve(args.model)
    name = Path(args.model).name
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(shapes) - set(SHAPE_FLAGS)
    if unknown:
        sys.exit(f"unknown shapes: {sorted(unknown)}")
    config = json.loads((model_dir / "config.json").read_text())
    max_model_len = min(2048, config["max_position_embeddings"])
    sides = ["vllm", *shapes]
    errors: list[str] = []
    # Other work on a shared machine shows in the figures: record how busy it was.
    header = [f"commit {git_commit()}; load average (1/5/15 min) at start {load_average()}"
              + (f"; disagg: cleave up {args.disagg_flags}" if args.disagg_flags else "")]
    print(header[0], file=sys.stderr, flush=True)
    rounds: list[dict[str, dict[str, dict]]] = []
    with tempfile.TemporaryDirectory(prefix="cleave-bench-vllm-") as tmp:
        for number in range(args.repeat):
            # Every other round in reverse order: no server always runs first, or right after
            # the same one, while the machine drifts over the run.
            order = sides if number % 2 == 0 else sides[::-1]
            round_dir = Path(tmp) / f"round{number + 1}"
            round_dir.mkdir()
            if args.repeat > 1:
                print(f"round {number + 1} of {args.repeat}: {', '.join(order)}", file=sys.stderr, flush=True)
            results = {}
            for side in order:  # one server at a time: each has the server core to itself
                figures = run_side(side, args, model_dir, name, config, max_model_len, round_dir, errors)
                if figures is not None:
                    results[side] = figures
            rounds.append(results)
    header.append(f"load average (1/5/15 min) at end {load_average()}")
    print_table(args, sides, rounds, header)
    for error in errors:
        print(f"failed: {error[:500]}")
    if args.json:
        keys = [key for key, _, _ in LOCUST_METRICS]
        figures = [{side: {label: {key: figs[key] for key in keys if key in figs} for label, figs in per.items()}
                    for side, per in results.items()} for results in rounds]
        print(json.dumps(figures[0] if len(figures) == 1 else figures))
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
