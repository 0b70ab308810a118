"""``cleave up | down | status``: the platform as local processes on one machine.

A small process supervisor: each process is a ``ProcessSpec``; ``up`` starts the
specs in order, detached into their own session, with logs and a pid file under
``$CLEAVE_HOME/run``, and waits for each to answer its health URL; ``down`` stops
them in reverse order (SIGTERM, a bounded wait, then SIGKILL). Today the platform is
one process (``cleave serve``); Redis, prefill, decode, kvstore and expert processes
join the same list later."""

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
from cleave.modelzoo.registry import DEFAULT_MODEL

LOG_TAIL_LINES = 40


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
        return is_alive(state.pid, state.argv)

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
            health_url=spec.health_url, info=spec.info,
        )
        self.pid_path(spec.name).write_text(f"{proc.pid}\n")
        self.state_path(spec.name).write_text(json.dumps(asdict(state), indent=2))
        return state

    def wait_healthy(self, state: ProcessState, timeout: float) -> None:
        """Wait until the health URL answers 200; raise ``StartupError`` if the process
        dies or the deadline passes (the process is then stopped)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive(state):
                self.forget(state.name)
                raise StartupError(f"{state.name} exited during startup")
            if state.health_url is None or http_ok(state.health_url):
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


def is_alive(pid: int, argv: Sequence[str] | None = None) -> bool:
    """True if ``pid`` runs and, where /proc can tell, is still the process we started
    (pids are reused) and not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return argv is None
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2 :].startswith("Z"):
            return False
        if argv:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            return [part.decode(errors="replace") for part in cmdline if part] == list(argv)
    except (OSError, ValueError):
        return False
    return True


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


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# -- commands ---------------------------------------------------------------------------


def platform_specs(args: argparse.Namespace, model_path: Path, extra: list[str]) -> list[ProcessSpec]:
    """The processes of the embedded platform, in start order."""
    base = f"http://{client_host(args.host)}:{args.port}"
    serve = [
        sys.executable, "-m", "cleave.cli", "serve",
        "--model", str(model_path),
        "--served-model-name", args.served_model_name or args.model,
        "--host", args.host,
        "--port", str(args.port),
        *extra,
    ]
    info = {"url": f"{base}/v1", "models": f"{base}/v1/models", "metrics": f"{base}/metrics",
            "model": args.served_model_name or args.model}
    return [ProcessSpec("router", serve, health_url=f"{base}/health", info=info)]


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
    if port_in_use(client_host(args.host), args.port):
        print(f"error: port {args.port} on {args.host} is already in use; pick another with --port", file=sys.stderr)
        return 1
    print(f"resolving model {args.model} ...", file=sys.stderr, flush=True)
    try:
        from cleave.router.main import resolve_model

        model_path = resolve_model(args.model)
    except Exception as exc:  # the registry's own errors name the problem
        print(f"error: cannot resolve model {args.model!r}: {exc}", file=sys.stderr)
        return 1
    print(f"model ready at {model_path}", file=sys.stderr, flush=True)
    started: list[ProcessState] = []
    for spec in platform_specs(args, model_path, extra):
        print(f"starting {spec.name} ...", file=sys.stderr, flush=True)
        state = supervisor.start(spec)
        started.append(state)
        try:
            supervisor.wait_healthy(state, args.timeout)
        except StartupError as exc:
            print(f"error: {exc}. Last lines of {state.log}:\n{supervisor.log_tail(spec.name)}", file=sys.stderr)
            for earlier in reversed(started[:-1]):
                supervisor.stop(earlier)
            return 1
    print_ready(started[-1])
    return 0


def print_ready(state: ProcessState) -> None:
    url, model = state.info["url"], state.info["model"]
    print(
        f"""cleave is up (model {model})
  REST API   {url}
  models     {state.info['models']}
  metrics    {state.info['metrics']}
  logs       {state.log}

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
        ready = alive and (state.health_url is None or http_ok(state.health_url))
        healthy &= ready
        condition = "running" if ready else ("running, not answering health checks" if alive else "dead")
        where = state.info.get("url", "")
        print(f"  {state.name:<10} {condition:<10} pid {state.pid:<8} {where}")
    return healthy


def cmd_status(args: argparse.Namespace) -> int:
    supervisor = Supervisor(cleave_home() / "run")
    states = supervisor.states()
    if not states:
        print("cleave is not running")
        return 0
    print("cleave processes:")
    return 0 if print_status(supervisor, states) else 1


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
        parser.description = "Start the platform in the background; unknown flags go to `cleave serve`."
        parser.add_argument("--model", default=os.environ.get("CLEAVE_MODEL", DEFAULT_MODEL),
                            help="model-zoo name or model folder")
        parser.add_argument("--served-model-name", default="", help="name clients send as `model`")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    elif command == "down":
        parser.description = "Stop every process `cleave up` started."
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait before SIGKILL")
    else:
        parser.description = "Show what `cleave up` started."
    return parser


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave up``, ``cleave down`` and ``cleave status``."""
    parser = build_parser(command)
    if command == "up":
        args, extra = parser.parse_known_args(argv)
        return cmd_up(args, extra)
    args = parser.parse_args(argv)
    return cmd_down(args) if command == "down" else cmd_status(args)
