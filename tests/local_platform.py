"""`cleave up` in a temporary CLEAVE_HOME on free ports, for tests that run the whole
platform as a user does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import httpx

from cleave.launcher import Supervisor, is_alive, wait_until

MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_range(width: int = 40) -> int:
    """A base port with ``width`` free ports above it, below the ephemeral range."""
    for base in range(20000 + (os.getpid() % 50) * 200, 32000, 100):
        if all(_bindable(base + i) for i in range(width)):
            return base
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Platform:
    """One `cleave up` with its own CLEAVE_HOME and ports."""

    def __init__(self, home: Path, model: Path | str, *flags: str, served_model_name: str = "tiny",
                 prometheus: bool = False) -> None:
        self.home = home
        self.model = model
        self.served_model_name = served_model_name
        self.port, self.grpc_port, self.redis_port = free_port(), free_port(), free_port()
        self.flags = [
            "--model", str(model), "--served-model-name", served_model_name, "--port", str(self.port),
            "--grpc-port", str(self.grpc_port), "--redis-port", str(self.redis_port),
            "--worker-base-port", str(free_range()), "--metrics-base-port", str(free_range() + 2000),
            "--timeout", "240", *flags,
        ]
        # Prometheus and Alertmanager only where a test asks for them.
        self.prometheus_port = free_port() if prometheus else None
        self.agent_port = free_port() if prometheus else None
        self.flags += (["--prometheus-port", str(self.prometheus_port), "--alertmanager-port", str(free_port()),
                        "--agent-port", str(self.agent_port)]
                       if prometheus else ["--no-prometheus"])
        if "--kafka-port" not in flags:
            self.flags.append("--no-events")  # a Kafka broker only where a test asks for one
        self.env = {**os.environ, "CLEAVE_HOME": str(home)}
        self.base_url = f"http://127.0.0.1:{self.port}"

    def cleave(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cleave.cli", *argv], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def up(self) -> None:
        result = self.cleave("up", *self.flags)
        assert result.returncode == 0, f"cleave up failed:\n{result.stdout}\n{result.stderr}\n{self.logs()}"

    def down(self) -> None:
        self.cleave("down", "--timeout", "20", timeout=120)

    def logs(self) -> str:
        run = self.home / "run"
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(run.glob("*.log"))) if run.is_dir() else ""

    def supervisor(self) -> Supervisor:
        return Supervisor(self.home / "run")

    def kill(self, name: str) -> None:
        state = self.supervisor().state(name)
        os.kill(state.pid, signal.SIGKILL)
        assert wait_until(lambda: not is_alive(state.pid), 10)

    def admin(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/admin/instances", timeout=5) as response:
            return json.loads(response.read())

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    def complete(self, prompt: list[int], max_tokens: int = MAX_TOKENS, **extra) -> httpx.Response:
        body = {"model": self.served_model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                **extra}
        return httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=120)


def grpc_generate(platform: Platform, prompt: list[int], max_tokens: int = MAX_TOKENS, on_item=None, **params):
    """Greedy tokens of one request through the router's public gRPC Generate, plus the
    call's initial metadata."""
    from cleave.protogen.cleave.v1 import common_pb2, generate_pb2, generate_pb2_grpc

    request = generate_pb2.GenerateRequest(
        model=platform.served_model_name, prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        params=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **params),
    )
    with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        call = generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=120)
        tokens, last = [], None
        for item in call:
            tokens.extend(item.token_ids)
            last = item
            if on_item is not None:
                on_item(item, call)
        return tokens, last, dict(call.initial_metadata())
