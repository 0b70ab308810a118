"""``cleave up | down | status``: the platform as local processes on one machine.

A small process supervisor: each process is a ``ProcessSpec``; ``up`` starts the
specs tier by tier, detached into their own session, with logs and a pid file under
``$CLEAVE_HOME/run``, and waits for each to pass its readiness probe (``http://`` a
200, ``grpc://`` a SERVING health check, ``tcp://`` an open port); ``down`` stops them
in reverse order (SIGTERM, a bounded wait, then SIGKILL).

The default platform is disaggregated: Redis, the KV store, the expert replicas (for an
MoE model), prefill and decode workers, and the router in front. ``--mode single``
runs the one-process server (``cleave serve``) instead."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from cleave.common.config import cleave_home
from cleave.engine.config import EngineConfig
from cleave.expert.spec import format_spec
from cleave.models.config import ModelConfig
from cleave.events.broker import add_broker
from cleave.modelzoo.registry import DEFAULT_MODEL

# What `cleave up` serves by default: an MoE model, so that every service has work.
PLATFORM_MODEL = "smollm2-moe"

LOG_TAIL_LINES = 40
# Decode workers and expert replicas when not given, on a machine with this many cores or more.
POOL_SIZE = 2
# Conditional disaggregation's threshold on one core: the workers' default token budget of a step.
ONE_CORE_LOCAL_PREFILL_TOKENS = EngineConfig().max_num_batched_tokens


@dataclass(slots=True)
class ProcessSpec:
    """One supervised process: how to start it and how to tell it is ready."""

    name: str
    argv: list[str]
    health_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)  # shown by ``status``


@dataclass(slots=True)
class ProcessState:
    """What the supervisor remembers about a started process (``<name>.json``)."""

    name: str
    pid: int
    argv: list[str]
    log: str
    started_at: float
    health_url: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    start_ticks: int | None = None


class StartupError(RuntimeError):
    pass


class Supervisor:
    """Starts, finds and stops detached processes recorded under ``run_dir``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def state_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    # -- what runs ----------------------------------------------------------------------

    def states(self) -> list[ProcessState]:
        """Every recorded process, oldest first."""
        out = []
        for path in sorted(self.run_dir.glob("*.json")) if self.run_dir.is_dir() else []:
            try:
                out.append(ProcessState(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(out, key=lambda s: s.started_at)

    def state(self, name: str) -> ProcessState | None:
        return next((s for s in self.states() if s.name == name), None)

    def is_alive(self, state: ProcessState) -> bool:
        return is_alive(state.pid, state.start_ticks)

    # -- start --------------------------------------------------------------------------

    def start(self, spec: ProcessSpec) -> ProcessState:
        """Start ``spec`` detached (its own session, so a terminal's Ctrl-C or the
        launcher exiting does not reach it) and record it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(spec.name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        with open(log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(spec.argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                spec.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        state = ProcessState(
            name=spec.name, pid=proc.pid, argv=spec.argv, log=str(log_path), started_at=time.time(),
            health_url=spec.health_url, info=spec.info, start_ticks=start_ticks(proc.pid),
        )
        self.pid_path(spec.name).write_text(f"{proc.pid}\n")
        self.state_path(spec.name).write_text(json.dumps(asdict(state), indent=2))
        return state

    def wait_healthy(self, state: ProcessState, timeout: float) -> None:
        """Wait until the readiness probe passes; raise ``StartupError`` if the process
        dies or the deadline passes (the process is then stopped)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive(state):
                self.forget(state.name)
                raise StartupError(f"{state.name} exited during startup")
            if state.health_url is None or probe(state.health_url):
                return
            if time.monotonic() >= deadline:
                self.stop(state)
                raise StartupError(f"{state.name} did not answer {state.health_url} within {timeout:.0f}s")
            time.sleep(0.2)

    # -- stop ---------------------------------------------------------------------------

    def stop(self, state: ProcessState, timeout: float = 30.0) -> str:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL. Returns how
        it ended: ``stopped``, ``killed`` or ``not running``."""
        how = "not running"
        if self.is_alive(state):
            how = "stopped"
            signal_group(state.pid, signal.SIGTERM)
            if not wait_until(lambda: not self.is_alive(state), timeout):
                signal_group(state.pid, signal.SIGKILL)
                wait_until(lambda: not self.is_alive(state), 5.0)
                how = "killed"
        self.forget(state.name)
        return how

    def forget(self, name: str) -> None:
        for path in (self.pid_path(name), self.state_path(name)):
            path.unlink(missing_ok=True)

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- process helpers --------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22); None
    where /proc cannot tell. A reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_alive(pid: int, started: int | None = None) -> bool:
    """True if ``pid`` runs and, where /proc can tell, is still the process we started
    (same start time: pids are reused) and not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return started is None
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2 :].startswith("Z"):
            return False
    except (OSError, ValueError):
        return False
    return started is None or start_ticks(pid) == started


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_until(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def grpc_serving(address: str, timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def probe(url: str) -> bool:
    """Readiness of ``http://...`` (200), ``grpc://host:port`` (SERVING) or ``tcp://host:port``."""
    scheme, _, rest = url.partition("://")
    if scheme == "grpc":
        return grpc_serving(rest)
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        return port_in_use(host, int(port))
    return http_ok(url)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# -- commands ---------------------------------------------------------------------------


def cleave_argv(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "cleave.cli", command, *args]


def single_specs(args: argparse.Namespace, model_path: Path, extra: list[str]) -> list[list[ProcessSpec]]:
    base = f"http://{client_host(args.host)}:{args.port}"
    serve = cleave_argv(
        "serve", "--model", str(model_path), "--served-model-name", args.served_model_name or args.model,
        "--host", args.host, "--port", str(args.port), "--grpc-port", str(args.grpc_port), *extra,
    )
    info = {**router_info(args, base), "grpc": f"{client_host(args.host)}:{args.grpc_port}"}
    return [[ProcessSpec("router", serve, health_url=f"{base}/health", info=info)]]


def router_info(args: argparse.Namespace, base: str) -> dict[str, str]:
    return {"url": f"{base}/v1", "models": f"{base}/v1/models", "metrics": f"{base}/metrics",
            "model": args.served_model_name or args.model}


def expert_groups(num_experts: int, moe_layers: Sequence[int], replicas: int, groups: int = 0,
                  placement: str = "layers") -> list[str]:
    """Each replica's experts spec: the (layer, expert) pairs split into ``groups`` groups
    (default: one per replica), replica ``i`` holding group ``i % groups``, so that
    replicas beyond the number of groups are spares of earlier ones.

    ``layers``: each group holds every expert of a contiguous run of MoE layers, so a
    forward pass makes one ``RunExperts`` call per MoE layer (with fewer MoE layers than
    groups the experts are split instead). ``experts``: each group holds a contiguous range
    of experts of every layer; a layer then takes one call per group, which the groups
    answer side by side: worth it only with cores to spare and batches large enough."""
    layers = sorted(moe_layers)
    by_layers = placement == "layers" and len(layers) >= (groups or replicas)
    groups = min(groups or replicas, len(layers) if by_layers else num_experts)
    if by_layers:
        bounds = [len(layers) * g // groups for g in range(groups + 1)]
        specs = [format_spec((layer, e) for layer in layers[bounds[g]:bounds[g + 1]] for e in range(num_experts))
                 for g in range(groups)]
    else:
        bounds = [num_experts * g // groups for g in range(groups + 1)]
        specs = [f"{bounds[g]}-{bounds[g + 1] - 1}" if bounds[g + 1] - 1 > bounds[g] else str(bounds[g])
                 for g in range(groups)]
    return [specs[i % groups] for i in range(replicas)]


def num_routed_experts(model_path: Path) -> int:
    """Routed experts per MoE layer, 0 for a dense model."""
    config = json.loads((model_path / "config.json").read_text())
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def disaggregated_specs(args: argparse.Namespace, model_path: Path, extra: list[str]) -> list[list[ProcessSpec]]:
    """Tiers of processes: each tier starts at once and is ready before the next starts."""
    host = client_host(args.host)
    grpc_base, metrics_base = args.worker_base_port, args.metrics_base_port
    redis_url = f"redis://{host}:{args.redis_port}/0"
    model = str(model_path)
    threads = ["--num-threads", str(args.worker_threads)]
    common = ["--host", args.host, "--redis-url", redis_url]
    redis_dir = cleave_home() / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    tiers: list[list[ProcessSpec]] = []
    if not port_in_use(host, args.redis_port):
        tiers.append([ProcessSpec(
            "redis",
            [redis_server_binary(), "--bind", host, "--port", str(args.redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(redis_dir), "--protected-mode", "yes"],
            health_url=f"tcp://{host}:{args.redis_port}", info={"url": redis_url},
        )])

    def worker(name: str, command: str, port: int, metrics_port: int, *flags: str) -> ProcessSpec:
        argv = cleave_argv(command, *common, "--port", str(port), "--metrics-port", str(metrics_port),
                           "--instance-id", name, *flags)
        return ProcessSpec(name, argv, health_url=f"grpc://{host}:{port}",
                           info={"url": f"{host}:{port}", "metrics": f"http://{host}:{metrics_port}/metrics"})

    stores = [worker(f"kvstore-{i}", "kvstore", grpc_base + i, metrics_base + i, "--capacity-mb", str(args.kvstore_capacity_mb))
              for i in range(args.kvstores)]
    experts = []
    worker_flags = ["--model", model, *threads, *extra]
    num_experts = num_routed_experts(model_path)
    if num_experts and args.expert_replicas > 0:
        experts = [worker(f"expert-{i}", "expert", grpc_base + 30 + i, metrics_base + 30 + i, "--model", model, "--experts", spec,
                          "--stream-port", str(grpc_base + 40 + i), *threads)
                   for i, spec in enumerate(expert_groups(num_experts, ModelConfig.from_pretrained(model_path).moe_layers,
                                                          args.expert_replicas, args.expert_groups, args.expert_placement))]
        worker_flags += ["--expert-backend", "remote"]
    tiers.append(stores + experts)
    tiers.append(
        [worker(f"prefill-{i}", "prefill", grpc_base + 10 + i, metrics_base + 10 + i, *worker_flags) for i in range(args.prefill_workers)]
        + [worker(f"decode-{i}", "decode", grpc_base + 20 + i, metrics_base + 20 + i, *worker_flags) for i in range(args.decode_workers)]
    )
    base = f"http://{host}:{args.port}"
    router = cleave_argv(
        "router", *common, "--model", model, "--served-model-name", args.served_model_name or args.model,
        "--port", str(args.port), "--grpc-port", str(args.grpc_port), "--instance-id", "router-0",
        "--local-prefill-tokens", str(args.local_prefill_tokens),
    )
    info = {**router_info(args, base), "grpc": f"{host}:{args.grpc_port}", "admin": f"{base}/admin/instances"}
    tiers.append([ProcessSpec("router", router, health_url=f"{base}/health", info=info)])
    return add_broker(tiers, args)


def redis_server_binary() -> str:
    import shutil

    found = shutil.which("redis-server")
    if found is None:
        raise StartupError("redis-server is not installed; run: make install (infra/scripts/redis.sh install)")
    return found


def platform_specs(args: argparse.Namespace, model_path: Path, extra: list[str]) -> list[list[ProcessSpec]]:
    """The processes of the embedded platform, in tiers of start order."""
    from cleave.observability.prometheus import prometheus_tiers
    from cleave.rca.service import agent_tiers

    specs = single_specs if args.mode == "single" else disaggregated_specs
    return specs(args, model_path, extra) + prometheus_tiers(args) + agent_tiers(args)


def ports_taken(tiers: list[list[ProcessSpec]], args: argparse.Namespace) -> list[str]:
    taken = []
    for spec in (spec for tier in tiers for spec in tier):
        if spec.name == "redis":
            continue
        for flag in ("--port", "--metrics-port", "--grpc-port", "--stream-port"):
            if flag in spec.argv:
                port = int(spec.argv[spec.argv.index(flag) + 1])
                if port and port_in_use(client_host(args.host), port):
                    taken.append(f"{spec.name} {flag} {port}")
    return taken


def cmd_up(args: argparse.Namespace, extra: list[str]) -> int:
    supervisor = Supervisor(cleave_home() / "run")
    running = [s for s in supervisor.states() if supervisor.is_alive(s)]
    if running:
        print("cleave is already running:")
        print_status(supervisor, running)
        print("Stop it with: cleave down")
        return 0
    for stale in supervisor.states():
        supervisor.forget(stale.name)
    print(f"resolving model {args.model} ...", file=sys.stderr, flush=True)
    try:
        from cleave.router.main import resolve_model

        model_path = resolve_model(args.model)
    except Exception as exc:  # the registry's own errors name the problem
        print(f"error: cannot resolve model {args.model!r}: {exc}", file=sys.stderr)
        return 1
    print(f"model ready at {model_path}", file=sys.stderr, flush=True)
    try:
        tiers = platform_specs(args, model_path, extra)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.expert_replicas == 0 and num_routed_experts(model_path):
        print("experts run inside the prefill and decode workers (--expert-replicas 0, the default on one core)",
              file=sys.stderr, flush=True)
    if args.mode != "single" and args.local_prefill_tokens:
        print(f"prompts of up to {args.local_prefill_tokens} tokens are prefilled on the decode workers "
              f"(--local-prefill-tokens {args.local_prefill_tokens}; {ONE_CORE_LOCAL_PREFILL_TOKENS} is the default "
              "on one core, 0 sends every prompt to the prefill workers)", file=sys.stderr, flush=True)
    if taken := ports_taken(tiers, args):
        print("error: ports already in use: " + ", ".join(taken) + "; stop what holds them or pick others "
              "(--port, --grpc-port)", file=sys.stderr)
        return 1
    started: list[ProcessState] = []
    for tier in tiers:
        states = []
        for spec in tier:
            print(f"starting {spec.name} ...", file=sys.stderr, flush=True)
            states.append(supervisor.start(spec))
        started += states
        for state in states:
            try:
                supervisor.wait_healthy(state, args.timeout)
            except StartupError as exc:
                print(f"error: {exc}. Last lines of {state.log}:\n{supervisor.log_tail(state.name)}", file=sys.stderr)
                for earlier in reversed(started):
                    supervisor.stop(earlier)
                return 1
            print(f"  {state.name} ready", file=sys.stderr, flush=True)
    print_ready(started)
    return 0


def print_ready(started: list[ProcessState]) -> None:
    state = next(s for s in started if s.name == "router")
    url, model = state.info["url"], state.info["model"]
    extra = ""
    if "grpc" in state.info:
        extra += f"\n  gRPC       {state.info['grpc']}  (cleave.v1.Generate/Generate, reflection on)"
    if "admin" in state.info:
        extra += f"\n  instances  {state.info['admin']}  (or: cleave status)"
    if prometheus := next((s for s in started if s.name == "prometheus"), None):
        extra += f"\n  Prometheus {prometheus.info['url']}  (config {prometheus.info['config']})"
    if agent := next((s for s in started if s.name == "agent"), None):
        extra += f"\n  ops agent  {agent.info['diagnoses']}  (alerts arrive at {agent.info['webhook']}; or: cleave diagnose)"
    if kafka := next((s for s in started if s.name == "kafka"), None):
        extra += f"\n  events     {kafka.info['url']}  (topic {kafka.info['topic']}; cleave events --bootstrap {kafka.info['url']})"
    print(
        f"""cleave is up (model {model})
  REST API   {url}{extra}
  models     {state.info['models']}
  metrics    {state.info['metrics']}
  logs       {Path(state.log).parent}

Try it:
  curl {url}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}", api_key="unused")
  reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

Stop it with: cleave down"""
    )


def print_status(supervisor: Supervisor, states: list[ProcessState]) -> bool:
    healthy = True
    for state in states:
        alive = supervisor.is_alive(state)
        ready = alive and (state.health_url is None or probe(state.health_url))
        healthy &= ready
        condition = "running" if ready else ("running, not ready" if alive else "dead")
        where = state.info.get("url", "")
        print(f"  {state.name:<12} {condition:<18} pid {state.pid:<8} {where}")
    return healthy


def fetch_json(url: str, timeout: float = 3.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def format_load(load: dict) -> str:
    keys = ("num_running", "num_waiting", "num_free_kv_blocks", "num_queued_prompt_tokens", "num_blocks",
            "num_bytes", "num_in_flight", "num_calls", "num_tokens")
    shown = [f"{k.removeprefix('num_')}={load[k]:g}" for k in keys if isinstance(load.get(k), (int, float))]
    return " ".join(shown) or "-"


def print_instances(snapshot: dict) -> None:
    """The registry as the router sees it: instances by role, with health and load."""
    print(f"registered instances (model {snapshot.get('model', '?')}):")
    for role, instances in snapshot.get("roles", {}).items():
        for inst in instances:
            print(f"  {role:<8} {inst['instance_id']:<12} {inst['health']:<12} {inst['address']:<18} "
                  f"in_flight={inst.get('in_flight', 0)} {format_load(inst.get('load', {}))}")


def cmd_status(args: argparse.Namespace) -> int:
    supervisor = Supervisor(cleave_home() / "run")
    states = supervisor.states()
    if not states:
        print("cleave is not running")
        return 0
    print("cleave processes:")
    healthy = print_status(supervisor, states)
    admin = next((s.info["admin"] for s in states if "admin" in s.info), None)
    if admin is not None:
        snapshot = fetch_json(admin)
        if snapshot is None:
            print(f"router admin endpoint {admin} is not answering")
            healthy = False
        else:
            print_instances(snapshot)
    return 0 if healthy else 1


def cmd_down(args: argparse.Namespace) -> int:
    supervisor = Supervisor(cleave_home() / "run")
    states = supervisor.states()
    if not states:
        print("cleave is not running")
        return 0
    for state in reversed(states):
        how = supervisor.stop(state, timeout=args.timeout)
        print(f"{state.name} (pid {state.pid}): {how}")
    return 0


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"cleave {command}")
    if command == "up":
        parser.description = (
            "Start the platform in the background. Unknown flags go to the prefill and decode workers "
            "(engine flags such as --max-num-seqs), or to `cleave serve` with --mode single."
        )
        parser.add_argument("--model", default=os.environ.get("CLEAVE_MODEL", PLATFORM_MODEL),
                            help=f"model-zoo name or model folder (default {PLATFORM_MODEL}, an MoE model)")
        parser.add_argument("--dense", action="store_true", help=f"serve the dense {DEFAULT_MODEL} instead")
        parser.add_argument("--mode", choices=("disaggregated", "single"), default="disaggregated",
                            help="the whole platform, or one process with the engine inside")
        parser.add_argument("--served-model-name", default="", help="name clients send as `model`")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000, help="router HTTP port")
        parser.add_argument("--grpc-port", type=int, default=50051, help="router gRPC port")
        parser.add_argument("--redis-port", type=int, default=6390, help="Redis port (started unless one answers)")
        parser.add_argument("--kafka-port", type=int, default=9092,
                            help="Kafka-protocol broker (Tansu) of the request events (started unless one answers)")
        parser.add_argument("--no-events", action="store_true", help="no broker, no request-lifecycle events")
        parser.add_argument("--prefill-workers", type=int, default=1)
        parser.add_argument("--decode-workers", type=int, default=None,
                            help=f"default {POOL_SIZE}, or one per core where `cleave up` may use fewer cores "
                                 "(its CPU affinity: taskset, a cpuset)")
        parser.add_argument("--expert-replicas", type=int, default=None,
                            help=f"for an MoE model; 0 keeps experts local (default {POOL_SIZE}, or one per core "
                                 "where `cleave up` may use fewer cores, and 0 on one core)")
        parser.add_argument("--expert-groups", type=int, default=0,
                            help="ways the experts are split (default: one group per replica); replicas beyond "
                                 "the groups hold a second copy, so one can die without a 503")
        parser.add_argument("--expert-placement", choices=("layers", "experts"), default="layers",
                            help="what a group holds: whole MoE layers (one expert call per layer per step; the "
                                 "default) or a range of experts of every layer (a call per group per layer)")
        parser.add_argument("--local-prefill-tokens", type=int, default=None,
                            help="prompts of at most this many tokens skip the prefill workers: a decode worker "
                                 "prefills them itself (conditional disaggregation; 0: never; default 0, or "
                                 f"{ONE_CORE_LOCAL_PREFILL_TOKENS}, a step's token budget, on one core)")
        parser.add_argument("--kvstores", type=int, default=1)
        parser.add_argument("--kvstore-capacity-mb", type=float, default=1024.0)
        parser.add_argument("--worker-base-port", type=int, default=50060,
                            help="workers' gRPC ports: kvstore base+0.., prefill +10.., decode +20.., expert +30.. "
                                 "(and the experts' RunExperts streams +40..)")
        parser.add_argument("--metrics-base-port", type=int, default=9460,
                            help="workers' /metrics ports, numbered as --worker-base-port")
        parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker process")
        parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
        parser.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus on 127.0.0.1")
        parser.add_argument("--alertmanager-port", type=int, default=9093, help="Alertmanager on 127.0.0.1")
        parser.add_argument("--no-prometheus", action="store_true", help="start neither Prometheus nor Alertmanager")
        parser.add_argument("--agent-port", type=int, default=8090, help="the ops agent (cleave agent) on 127.0.0.1")
        parser.add_argument("--no-agent", action="store_true",
                            help="no ops agent; Alertmanager then notifies no one (also implied by --no-prometheus)")
    elif command == "down":
        parser.description = "Stop every process `cleave up` started."
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait before SIGKILL")
    else:
        parser.description = "Show what `cleave up` started, and the instances registered with the router."
    return parser


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a cpuset), which
    every process it starts inherits."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def size_pools(args: argparse.Namespace, cores: int) -> None:
    """Fill the pool sizes left unset: up to POOL_SIZE each, no more than the cores. On one
    core two decode workers split the batch (each step pays its fixed costs and an expert
    call per MoE layer for half the sequences) and cannot run at once anyway; and an expert
    replica, which cannot compute beside its callers there, only adds its calls: the
    workers run their experts themselves (about 30% less CPU per token under load,
    docs/benchmarks.md run L). For the same reason a prompt that fits one step goes
    straight to a decode worker there: a prefill worker on the same core cannot keep it
    off the decode batch's core, and the separate forward pass and the blocks' hand-off
    through the store cost the one-core platform about a third of its throughput under
    load (docs/benchmarks.md run Q)."""
    per_pool = max(1, min(POOL_SIZE, cores))
    if args.decode_workers is None:
        args.decode_workers = per_pool
    if args.expert_replicas is None:
        args.expert_replicas = max(per_pool if cores > 1 else 0, args.expert_groups)
    if args.local_prefill_tokens is None:
        args.local_prefill_tokens = ONE_CORE_LOCAL_PREFILL_TOKENS if cores == 1 else 0


def check_up_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dense:
        args.model = DEFAULT_MODEL
    size_pools(args, usable_cores())
    for name in ("prefill_workers", "decode_workers", "kvstores", "worker_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.expert_replicas < 0 or args.expert_groups < 0:
        parser.error("--expert-replicas and --expert-groups must be >= 0")
    if args.local_prefill_tokens < 0:
        parser.error("--local-prefill-tokens must be >= 0")
    if args.expert_groups > args.expert_replicas:
        parser.error("--expert-groups must be <= --expert-replicas: every group needs a replica")
    for name, limit in (("prefill_workers", 10), ("decode_workers", 10), ("kvstores", 10), ("expert_replicas", 10)):
        if getattr(args, name) > limit:
            parser.error(f"--{name.replace('_', '-')} must be <= {limit} (ports are numbered from a base)")
    for name in ("worker_base_port", "metrics_base_port"):
        if not 1024 <= getattr(args, name) <= 65535 - 40:
            parser.error(f"--{name.replace('_', '-')} must be in [1024, 65495]")


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave up``, ``cleave down`` and ``cleave status``."""
    parser = build_parser(command)
    if command == "up":
        args, extra = parser.parse_known_args(argv)
        check_up_args(parser, args)
        return cmd_up(args, extra)
    args = parser.parse_args(argv)
    return cmd_down(args) if command == "down" else cmd_status(args)
