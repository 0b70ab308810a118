"""loadtest/locustfile.py, headless, against the default platform (`make up`'s MoE model):
short, bounded runs that must end by themselves with no failures and with TTFT, ITL and
E2E statistics in their CSV, over REST, over gRPC and replaying the Mooncake trace."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from local_platform import Platform

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
TRACE = ROOT / "../shared/datasets/traces/mooncake_conversation_trace.jsonl"


@pytest.fixture(scope="module")
def platform(smollm2_moe_dir, tmp_path_factory):
    p = Platform(tmp_path_factory.mktemp("loadtest-home"), smollm2_moe_dir, served_model_name="smollm2-moe")
    try:
        p.up()
        yield p
    finally:
        p.down()


def run_locust(platform: Platform, out: Path, *args: str, users: int = 4, seconds: int = 20) -> dict:
    """One headless run; returns the final statistics rows by (type, name)."""
    prefix = out / "run"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-H", platform.base_url, "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "30",
        "--csv", str(prefix), "--html", str(out / "report.html"), *args,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}\n{platform.logs()}"
    assert (out / "report.html").stat().st_size > 0
    with open(f"{prefix}_stats.csv") as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, rows
    with open(f"{prefix}_tokens.csv") as tokens:
        rows["tokens"] = list(csv.DictReader(tokens))
    return rows


def assert_streamed(rows: dict, name: str) -> None:
    for kind in ("TTFT", "ITL", "E2E"):
        row = rows[(kind, name)]
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row
    (tokens,) = [t for t in rows["tokens"] if t["Name"] == name]
    assert int(tokens["Output Tokens"]) > 0 and float(tokens["Output Tokens/s"]) > 0, tokens


def assert_tpot_per_request(rows: dict, name: str) -> None:
    """One TPOT sample per request (each of these has more than one output token)."""
    tpot, e2e = rows[("TPOT", name)], rows[("E2E", name)]
    assert int(tpot["Request Count"]) == int(e2e["Request Count"]) > 0, (tpot, e2e)
    assert int(tpot["Failure Count"]) == 0 and float(tpot["Average Response Time"]) > 0, tpot


def test_rest_users_stream_fixed_lengths_without_failures(platform, tmp_path):
    rows = run_locust(platform, tmp_path, "--shape", "fixed", "--prompt-tokens", "48", "--output-tokens", "8")
    assert_streamed(rows, "fixed")
    # E2E's content size is the output tokens of a request: ignore_eos makes it exact.
    assert float(rows[("E2E", "fixed")]["Average Content Size"]) == 8
    assert_tpot_per_request(rows, "fixed")


def test_grpc_users_stream_through_generate(platform, tmp_path):
    rows = run_locust(platform, tmp_path, "--grpc-host", f"127.0.0.1:{platform.grpc_port}", "--shape", "random",
                      "--prompt-tokens-range", "16:48", "--output-tokens-range", "4:8", users=2, seconds=10)
    assert_streamed(rows, "grpc/random")
    assert_tpot_per_request(rows, "grpc/random")


@pytest.mark.skipif(not TRACE.is_file(), reason="the Mooncake trace is not beside the repository")
def test_mooncake_trace_replay_ends_with_the_trace(platform, tmp_path):
    # The first 8 requests, 100x faster and 1/128 of their length: they fit the CPU model.
    rows = run_locust(platform, tmp_path, "--shape", "mooncake", "--trace-limit", "8", "--trace-scale", "0.01",
                      "--length-scale", str(1 / 128), "--max-output-tokens", "6", users=3, seconds=40)
    assert int(rows[("E2E", "mooncake")]["Request Count"]) == 8
    assert_streamed(rows, "mooncake")
