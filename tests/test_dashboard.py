"""The router's live status page: the quantile-from-buckets function, the sampler's
derived numbers on a worker pool set by hand, the data route over a real Redis, and a
whole platform whose `/dashboard` renders in headless Chromium (screenshot kept under
test-artifacts/)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis import asyncio as aioredis

from cleave.common.registry import InstanceRecord
from cleave.launcher import wait_until
from cleave.router.dashboard import (
    DECISIONS_KEY,
    DIAGNOSES_KEY,
    DashboardSampler,
    add_dashboard_routes,
    quantile_from_buckets,
)
from cleave.router.metrics import RouterMetrics
from cleave.router.service import RouterConfig
from cleave.router.workers import WorkerPool
from local_platform import Platform

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
INF = math.inf

# -- quantiles from cumulative buckets ------------------------------------------------------

EVEN = [(0.1, 0), (0.5, 10), (1.0, 10), (INF, 10)]


@pytest.mark.parametrize("q, buckets, expected", [
    (0.5, EVEN, 0.3),  # halfway through the (0.1, 0.5] bucket
    (0.9, EVEN, 0.46),
    (1.0, EVEN, 0.5),
    (0.5, [(1.0, 4), (2.0, 8), (INF, 8)], 1.0),  # rank 4 ends the first bucket
    (0.25, [(1.0, 4), (2.0, 8), (INF, 8)], 0.5),  # the first bucket starts at 0
    (0.75, [(1.0, 4), (2.0, 8), (INF, 8)], 1.5),
    (0.9, [(1.0, 1), (2.0, 1), (INF, 10)], 2.0),  # in +Inf: the largest finite bound
    (0.5, [(0.1, 0), (0.5, 0), (INF, 0)], None),  # no observations
])
def test_quantile_from_buckets(q, buckets, expected):
    result = quantile_from_buckets(q, buckets)
    assert result == expected if expected is None else result == pytest.approx(expected)


@pytest.mark.parametrize("q, buckets", [(1.5, EVEN), (-0.1, EVEN), (0.5, [(0.1, 0), (0.5, 1)])])
def test_quantile_from_buckets_rejects_bad_input(q, buckets):
    with pytest.raises(ValueError):
        quantile_from_buckets(q, buckets)


# -- the sampler on a pool set by hand -------------------------------------------------------

MODEL = "tiny"


def record(role: str, instance_id: str, **load) -> InstanceRecord:
    return InstanceRecord(role, instance_id, "127.0.0.1:1", capabilities={"model": MODEL}, load=load)


def hand_set_pool(redis_url: str = "redis://127.0.0.1:1") -> WorkerPool:
    pool = WorkerPool(aioredis.Redis.from_url(redis_url), MODEL)
    pool.records.update({
        "prefill": [record("prefill", "prefill-0", num_running=1, num_waiting=2)],
        "decode": [record("decode", "decode-0", num_running=3, num_waiting=0),
                   record("decode", "decode-1", num_running=0, num_waiting=0)],
        "expert": [record("expert", "expert-0", num_calls=10, num_tokens=100),
                   record("expert", "expert-1", num_calls=0, num_tokens=0)],
        "kvstore": [record("kvstore", "kvstore-0")],
        "router": [record("router", "router-a")],
    })
    pool.health.update({"prefill-0": "SERVING", "decode-0": "SERVING", "decode-1": "NOT_SERVING",
                        "expert-0": "SERVING", "expert-1": "SERVING", "kvstore-0": "SERVING"})
    return pool


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_sampler_derives_pools_rates_quantiles_and_hit_rate_over_its_window():
    pool, metrics, clock = hand_set_pool(), RouterMetrics(), Clock()
    sampler = DashboardSampler(pool, metrics, interval=2.0, window_seconds=4.0, history_seconds=10.0, clock=clock)
    first = sampler.sample()
    assert first["pools"]["decode"] == {"live": 2, "serving": 1}
    assert first["pools"]["prefill"] == {"live": 1, "serving": 1}
    assert first["pools"]["router"] == {"live": 1, "serving": 1}
    assert first["pd_ratio"] == 1.0  # one serving prefill worker per serving decode worker
    assert first["ttft_p50"] is None and first["kv_hit_rate"] is None and first["request_rate"] == 0
    assert first["workers"]["prefill-0"] == {"role": "prefill", "num_running": 1, "num_waiting": 2, "health": "SERVING"}

    # 2 s later: 4 generation requests (one a 5xx), a /health call that does not count,
    # TTFTs of 0.3 s (x3) and 3 s, 100 prompt tokens of which 40 cached, expert-0 busy.
    clock.t += 2
    for outcome in ("success", "success", "success", "server_error"):
        metrics.requests.labels("completions", outcome).inc()
    metrics.requests.labels("health", "server_error").inc()
    for value in (0.3, 0.3, 0.3, 3.0):
        metrics.ttft.observe(value)
    for _ in range(10):
        metrics.itl.observe(0.02)
    metrics.prompt_tokens.inc(100)
    metrics.cached_tokens.inc(40)
    pool.records["expert"][0].load.update(num_calls=30, num_tokens=500)
    second = sampler.sample()
    assert second["request_rate"] == 2.0 and second["error_rate"] == 0.5
    assert second["kv_hit_rate"] == 0.4
    assert 0.25 < second["ttft_p50"] <= 0.5  # in the (0.25, 0.5] bucket
    assert second["ttft_p90"] == pytest.approx(4.0)  # 3.6 of 4 falls in (2.5, 5]
    assert 0.01 < second["tpot_p50"] <= 0.025 and 0.01 < second["tpot_p90"] <= 0.025
    assert second["experts"] == {"expert-0": {"calls_per_s": 10.0, "tokens_per_s": 200.0},
                                 "expert-1": {"calls_per_s": 0.0, "tokens_per_s": 0.0}}
    assert second["totals"]["requests"] == 4

    # The window is 4 s: 4 s after the traffic it has left the window.
    clock.t += 2
    assert sampler.sample()["request_rate"] == 1.0  # 4 requests over the 4 s window
    clock.t += 2
    quiet = sampler.sample()
    assert quiet["request_rate"] == 0 and quiet["ttft_p90"] is None and quiet["kv_hit_rate"] is None
    # The ring buffer holds history_seconds / interval samples, oldest dropped first.
    for _ in range(10):
        clock.t += 2
        sampler.sample()
    assert len(sampler.samples) == 5 and sampler.samples[-1]["t"] == clock.t
    assert [s["t"] for s in sampler.since(clock.t - 4)] == [clock.t - 2, clock.t]


# -- the routes over a real Redis ------------------------------------------------------------


def test_data_route_serves_samples_targets_and_the_latest_decisions(redis_url):
    import redis

    with redis.Redis.from_url(redis_url) as client:
        for i in range(12):
            client.lpush(DECISIONS_KEY, json.dumps({"ts": 1000 + i, "role": "decode", "replicas": i}))
        client.lpush(DIAGNOSES_KEY, "not json")
    app = FastAPI()
    config = RouterConfig(model=MODEL, redis_url=redis_url, ttft_target_seconds=1.0)
    add_dashboard_routes(app, hand_set_pool(redis_url), RouterMetrics(), config)
    with TestClient(app) as client:
        assert wait_until(lambda: client.get("/dashboard/data").json()["current"] is not None, 10)
        data = client.get("/dashboard/data").json()
        page = client.get("/dashboard")
    assert data["targets"] == {"ttft_seconds": 1.0, "tpot_seconds": 0.2}
    assert data["current"]["pools"]["decode"] == {"live": 2, "serving": 1}
    assert [d["replicas"] for d in data["decisions"]] == list(range(11, 1, -1))  # newest 10, newest first
    assert data["diagnoses"] == [{"raw": "not json"}]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<svg" not in page.text.split("<script>")[0]  # plots are drawn by the page's script
    assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external assets


def test_data_route_without_redis_still_answers():
    app = FastAPI()
    add_dashboard_routes(app, hand_set_pool("redis://127.0.0.1:1"), RouterMetrics(),
                         RouterConfig(model=MODEL, redis_url="redis://127.0.0.1:1"))
    with TestClient(app) as client:
        data = client.get("/dashboard/data").json()
    assert data["decisions"] == [] and data["decisions_error"]


# -- the whole platform, rendered in headless Chromium ---------------------------------------


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct pixel values of an 8-bit RGB(A) PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    colours = {row[i:i + channels] for row in rows[::8] for i in range(0, stride, channels * 8)}
    return width, height, len(colours)


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed; run make install-test (infra/scripts/chromium.sh install)")
    return binary


def headless(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1400,1000", "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def platform(tiny_models, tmp_path_factory):
    p = Platform(tmp_path_factory.mktemp("dashboard"), tiny_models["llama"], "--prefill-workers", "1",
                 "--decode-workers", "2", "--num-kv-blocks", "128", "--max-model-len", "256", "--block-size", "16")
    try:
        p.up()
        yield p
    finally:
        p.down()


def test_dashboard_shows_the_live_platform_and_renders_in_chromium(platform):
    shared = list(range(5, 5 + 48))
    prompts = [shared + [100 + i] for i in range(6)]
    for prompt in prompts:
        assert platform.complete(prompt, max_tokens=8).status_code == 200

    url = f"{platform.base_url}/dashboard/data"

    def caught_up() -> dict | None:
        data = httpx.get(url, timeout=10).json()
        current = data["current"]
        ok = (current and current["totals"]["requests"] == len(prompts)
              and current["pools"]["decode"]["serving"] == 2 and current["pools"]["prefill"]["serving"] == 1)
        return data if ok else None

    assert wait_until(caught_up, 30), httpx.get(url).json()["current"]
    data = caught_up()
    current = data["current"]
    assert current["pools"]["kvstore"]["serving"] >= 1 and current["pools"]["router"]["live"] == 1
    assert current["pd_ratio"] == 0.5
    assert set(current["workers"]) == {"prefill-0", "decode-0", "decode-1"}
    assert data["targets"] == {"ttft_seconds": 2.0, "tpot_seconds": 0.2}
    assert data["decisions"] == [] and data["diagnoses"] == []
    assert current["totals"]["cached_tokens"] > 0  # the shared 48-token prefix was reused
    window = [s for s in data["samples"] if s["ttft_p50"] is not None]
    assert window and all(s["ttft_p50"] <= s["ttft_p90"] for s in window)
    assert any(s["kv_hit_rate"] and 0 < s["kv_hit_rate"] < 1 for s in data["samples"])
    assert sum(s["request_rate"] for s in data["samples"]) > 0

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    page = f"{platform.base_url}/dashboard"
    shot = headless(f"--screenshot={screenshot}", page)
    assert screenshot.is_file(), f"no screenshot:\n{shot.stderr[-3000:]}"
    width, height, colours = png_size_and_colours(screenshot)
    assert (width, height) == (1400, 1000) and colours > 8, (width, height, colours)

    dom = headless("--dump-dom", page).stdout
    (ARTIFACTS / "dashboard.html").write_text(dom)
    assert 'id="pool-decode-serving">2<' in dom and 'id="pool-prefill-serving">1<' in dom, dom[:2000]
    assert dom.count('<svg class="plot"') >= 4 and 'class="series"' in dom and 'class="target"' in dom
    assert ">1 : 2<" in dom and "none yet" in dom
