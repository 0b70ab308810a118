"""``cleave up | status | down`` with a tiny model, in a temporary CLEAVE_HOME, in
single-process mode; tests/test_platform.py runs the disaggregated platform."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from cleave.engine.config import EngineConfig
from cleave.launcher import (ONE_CORE_LOCAL_PREFILL_TOKENS, Supervisor, build_parser, disaggregated_specs, is_alive,
                             size_pools, usable_cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cleave_cli(tmp_path):
    env = {**os.environ, "CLEAVE_HOME": str(tmp_path / "home")}

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cleave.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    yield run
    run("down", "--timeout", "5")  # never leave a server behind, whatever failed


def test_up_status_down(cleave_cli, tiny_models, tmp_path):
    port = free_port()
    model = str(tiny_models["llama"])
    up = cleave_cli("up", "--mode", "single", "--model", model, "--served-model-name", "tiny", "--port", str(port),
                    "--grpc-port", str(free_port()), "--timeout", "120", "--max-model-len", "256", "--kv-cache-memory-mb", "16",
                    "--no-prometheus")
    assert up.returncode == 0, up.stderr
    base = f"http://127.0.0.1:{port}"
    for url in (f"{base}/v1", f"{base}/v1/models", f"{base}/metrics"):
        assert url in up.stdout
    assert "OpenAI(base_url=" in up.stdout and "curl " in up.stdout

    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    card = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]
    assert (card["id"], card["max_model_len"]) == ("tiny", 256)

    again = cleave_cli("up", "--model", model, "--port", str(port))
    assert again.returncode == 0 and "already running" in again.stdout

    status = cleave_cli("status")
    assert status.returncode == 0
    assert "router" in status.stdout and "running" in status.stdout and f"{base}/v1" in status.stdout

    supervisor = Supervisor(tmp_path / "home" / "run")
    (state,) = supervisor.states()
    assert supervisor.pid_path("router").read_text().strip() == str(state.pid)
    assert is_alive(state.pid, state.start_ticks)

    # A stream in flight when `down` sends SIGTERM is allowed to finish.
    body = {"model": "tiny", "prompt": "The river", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))
        down = threading.Thread(target=lambda: events.append(f"down rc {cleave_cli('down').returncode}"))
        down.start()
        events.extend(line for line in lines if line.startswith("data: "))
    down.join(timeout=60)
    assert events[-2] == "data: [DONE]", events[-3:]
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "down rc 0"

    assert not is_alive(state.pid, state.start_ticks)
    assert not supervisor.pid_path("router").exists()
    assert "not running" in cleave_cli("status").stdout
    assert "not running" in cleave_cli("down").stdout


def test_up_reports_a_server_that_dies_during_startup(cleave_cli, tiny_models, tmp_path):
    up = cleave_cli("up", "--mode", "single", "--model", str(tiny_models["llama"]), "--port", str(free_port()),
                    "--grpc-port", str(free_port()), "--timeout", "120", "--block-size", "3",
                    "--no-prometheus")
    assert up.returncode == 1
    assert "exited during startup" in up.stderr
    assert "block_size must be a power of two" in up.stderr  # the log tail says why
    assert Supervisor(tmp_path / "home" / "run").states() == []


def test_up_refuses_a_busy_port(cleave_cli, tiny_models):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = cleave_cli("up", "--model", str(tiny_models["llama"]), "--port", str(port))
    assert up.returncode == 1
    assert "already in use" in up.stderr


def test_up_rejects_an_unknown_model(cleave_cli):
    up = cleave_cli("up", "--model", "no-such-model", "--port", str(free_port()))
    assert up.returncode == 1
    assert "no-such-model" in up.stderr


@pytest.mark.parametrize("args, specs", [
    # Whole layers per replica: one RunExperts call per MoE layer per forward pass.
    ((8, [0, 1], 2), ["0:0-7", "1:0-7"]),
    ((4, range(30), 2), ["0-14:0-3", "15-29:0-3"]),
    ((4, [1, 3, 5], 2), ["1:0-3", "3:0-3,5:0-3"]),  # MoE only every other layer
    ((8, [0, 1], 3, 2), ["0:0-7", "1:0-7", "0:0-7"]),  # replica 2 a spare of replica 0
    # Fewer MoE layers than groups, or asked for: experts split within each layer.
    ((8, [0], 2), ["0-3", "4-7"]),
    ((8, [0, 1], 4), ["0-1", "2-3", "4-5", "6-7"]),
    ((8, [0, 1], 2, 0, "experts"), ["0-3", "4-7"]),
    ((3, [0, 1], 4, 0, "experts"), ["0", "1", "2", "0"]),
])
def test_expert_groups(args, specs):
    from cleave.expert.spec import parse_spec
    from cleave.launcher import expert_groups

    assert expert_groups(*args) == specs
    num_experts, layers = args[0], list(args[1])
    held = [parse_spec(spec, layers, num_experts) for spec in specs]
    groups = {spec: pairs for spec, pairs in zip(specs, held)}
    # The groups partition every (layer, expert) pair of the model.
    assert sorted(p for pairs in groups.values() for p in pairs) == [(l, e) for l in layers for e in range(num_experts)]


@pytest.mark.parametrize("cores, argv, pools", [
    (1, [], (1, 0)),  # one core: one decode worker batching everything, its experts in it
    (2, [], (2, 2)),
    (16, [], (2, 2)),
    (1, ["--decode-workers", "3"], (3, 0)),  # what is given is kept
    (1, ["--expert-groups", "2"], (1, 2)),  # every group needs a replica
    (1, ["--expert-replicas", "1"], (1, 1)),
    (2, ["--expert-replicas", "0"], (2, 0)),
])
def test_pools_are_sized_to_the_cores_unless_given(cores, argv, pools):
    args, _ = build_parser("up").parse_known_args(argv)
    size_pools(args, cores)
    assert (args.decode_workers, args.expert_replicas) == pools


@pytest.mark.parametrize("cores, argv, threshold", [
    (1, [], ONE_CORE_LOCAL_PREFILL_TOKENS),  # a prefill worker on the decode worker's core only adds its hand-off
    (2, [], 0),
    (8, [], 0),
    (1, ["--local-prefill-tokens", "0"], 0),  # what is given is kept
    (2, ["--local-prefill-tokens", "64"], 64),
])
def test_one_core_prefills_a_prompt_of_one_step_on_the_decode_worker(cores, argv, threshold):
    args, _ = build_parser("up").parse_known_args(argv)
    size_pools(args, cores)
    assert args.local_prefill_tokens == threshold
    assert ONE_CORE_LOCAL_PREFILL_TOKENS == EngineConfig().max_num_batched_tokens


def test_up_hands_the_local_prefill_threshold_to_the_router(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    for argv, given in (([], "0"), (["--local-prefill-tokens", "256"], "256")):
        args, extra = build_parser("up").parse_known_args(["--no-events", *argv])
        size_pools(args, 2)
        router = next(s for tier in disaggregated_specs(args, tiny_models["mixtral"], extra) for s in tier
                      if s.name == "router")
        assert router.argv[router.argv.index("--local-prefill-tokens") + 1] == given
    from cleave.router.service import RouterConfig
    with pytest.raises(ValueError, match="local_prefill_tokens must be >= 0"):
        RouterConfig(local_prefill_tokens=-1)


def test_usable_cores_follow_the_affinity_mask():
    mask = sorted(os.sched_getaffinity(0))
    out = subprocess.run(["taskset", "-c", str(mask[0]), sys.executable, "-c",
                          "from cleave.launcher import usable_cores; print(usable_cores())"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert usable_cores() == len(mask)
