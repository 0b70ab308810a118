"""The ops agent on real parts on 127.0.0.1: a real Prometheus serving a recorded incident
(tests/recorded_incident.py: kvstore-0 slows down 50 times, prefill, decode and the router
follow), a real Redis, a real Kafka-protocol broker (Tansu), a real Alertmanager.

It shows: ``cleave diagnose`` names the planted root cause with the PromQL that shows it
and a progress display; Prometheus away or empty gives a clear error (exit 1, HTTP 503),
never a traceback; an LLM that is away, slow, answers garbage, names a non-candidate or
never concludes leaves the statistical ranking standing with the reason in the report; a
valid LLM verdict among the candidates is taken; a real Cleave server as the LLM; and
``cleave agent``, fed by Alertmanager's own webhook, deduplicates alerts and publishes each
report to Redis (the dashboard's list) and Kafka."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry

from cleave.common.registry import InstanceRecord, Registry
from cleave.events.broker import broker_argv
from cleave.events.publisher import EventPublisher
from cleave.events.schema import make_event
from cleave.events.consumer import tail
from cleave.launcher import port_in_use, wait_until
from cleave.observability.prometheus import alertmanager_config, write_yaml
from cleave.observability.status_lists import DIAGNOSES_KEY
from cleave.rca.agent import DIAGNOSES_TOPIC, DISABLED, diagnose
from cleave.rca.llm import LlmConfig
from local_platform import free_port
from recorded_incident import ROOT_CAUSE, Incident, RecordedPrometheus

WINDOW = 600.0
AFTER_FAULT = 200.0  # the window ends this long after the fault


@pytest.fixture(scope="module")
def incident(tmp_path_factory) -> RecordedPrometheus:
    # The fault was 4 minutes ago and the recording goes on 15 minutes into the future, so
    # that a scheduled diagnosis of "the last window" sees it whenever the test runs.
    fault = float(int(time.time() - 240) // 2 * 2)
    recording = Incident(fault, after=240 + 900).build()
    prometheus = RecordedPrometheus(tmp_path_factory.mktemp("recorded-prometheus"), recording, free_port())
    try:
        yield prometheus.start()
    finally:
        prometheus.stop()


def window(incident: RecordedPrometheus) -> tuple[float, float]:
    end = incident.incident.fault + AFTER_FAULT
    return end - WINDOW, end


def cleave(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cleave.cli", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CLEAVE_LOG_LEVEL": "warning"})


def diagnose_args(incident: RecordedPrometheus, *extra: str) -> list[str]:
    return ["diagnose", "--prometheus-url", incident.url, "--end", str(window(incident)[1]), "--window", "10m",
            "--redis-url", "", "--events-bootstrap", "", *extra]


def instant(url: str, promql: str, at: float) -> float:
    result = httpx.get(f"{url}/api/v1/query", params={"query": promql, "time": at}, timeout=10).json()
    return float(result["data"]["result"][0]["value"][1])


# -- cleave diagnose -------------------------------------------------------------------------


def test_diagnose_json_names_the_planted_root_cause_with_evidence_and_progress(incident):
    result = cleave(*diagnose_args(incident, "--no-llm", "--json"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    fault = incident.incident.fault
    assert report["schema_version"] == 1 and report["id"].startswith("diag-")
    assert report["root_cause"]["component"] == ROOT_CAUSE
    assert report["root_cause"]["chosen_by"] == "statistics" and report["statistics_only"] is True
    assert report["llm"] == {"used": False, "url": None, "model": None, "accepted": False, "verdict": None,
                             "reason": DISABLED, "queries": []}
    assert abs(report["anomaly_time"] - fault) <= 10 and report["anomaly_time_detected"] is True
    assert [c["rank"] for c in report["candidates"]] == list(range(1, len(report["candidates"]) + 1))
    assert report["candidates"][0]["component"] == ROOT_CAUSE and report["candidates"][0]["role"] == "kvstore"
    assert "KV store kvstore-0" in report["action"]
    assert set(report["rankers"]) == {"ours", "baro", "nsigma"}
    assert report["rankers"]["ours"][0]["component"] == ROOT_CAUSE
    # Each evidence row's PromQL, run on its own, shows the deviation the row reports.
    for evidence in report["candidates"][0]["evidence"]:
        assert f'instance_id="{ROOT_CAUSE}"' in evidence["promql"]
        before = instant(incident.url, evidence["promql"], fault - 60)
        after = instant(incident.url, evidence["promql"], fault + 60)
        assert after > 10 * before, (evidence, before, after)
        assert math.isclose(before, evidence["normal"], rel_tol=0.2)
    assert report["timeline"][0]["time"] <= report["root_cause"]["onset"]
    assert any(e["component"] == ROOT_CAUSE for e in report["timeline"])
    steps = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [s.split("] ", 1)[1].split(" ")[0] for s in steps[:3]] == ["reading", "", "anomaly"], steps
    assert any("root cause: kvstore-0" in s for s in steps)
    assert report["summary"].startswith("kvstore-0: ")


def test_diagnose_markdown_carries_cause_action_and_queries(incident):
    result = cleave(*diagnose_args(incident, "--no-llm", "--quiet", "--anomaly-time", str(incident.incident.fault)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert text.startswith("# Diagnosis diag-")
    assert "**kvstore-0**" in text and "**Suggested action.**" in text and "(given)" in text
    assert 'cleave_kvstore_transfer_seconds_sum{job="cleave",instance_id="kvstore-0"}' in text
    assert f"Not used: {DISABLED}. The statistical ranking stands." in text


def test_diagnose_without_prometheus_is_a_clear_error_not_a_traceback():
    port = free_port()
    result = cleave("diagnose", "--prometheus-url", f"http://127.0.0.1:{port}", "--no-llm", "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"error: Prometheus at http://127.0.0.1:{port} cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_diagnose_of_a_window_without_data_is_a_clear_error(incident):
    result = cleave("diagnose", "--prometheus-url", incident.url, "--end", str(incident.incident.fault - 2000),
                    "--no-llm", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: no metrics to diagnose" in result.stderr and "no Cleave target" in result.stderr


def test_diagnose_rejects_bad_arguments():
    result = cleave("diagnose", "--window", "ten minutes")
    assert result.returncode == 2 and "not a duration" in result.stderr


# -- the LLM ---------------------------------------------------------------------------------


class ScriptedLLM:
    """An OpenAI-compatible endpoint that answers the next of ``replies`` (a string is the
    message content; an int is an HTTP error status; ``("sleep", s)`` answers after ``s``
    seconds). A real model cannot be made to answer a given verdict, so the tests that
    need one exact answer use this; the request path to a real Cleave server is tested
    below with a real model."""

    def __init__(self) -> None:
        self.replies: list = []
        self.requests: list[dict] = []
        self.app = FastAPI()

        @self.app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.requests.append(await request.json())
            reply = self.replies.pop(0) if self.replies else "no more replies"
            if isinstance(reply, tuple):
                await asyncio.sleep(reply[1])
                reply = '{"root_cause": "kvstore-0", "explanation": "late"}'
            if isinstance(reply, int):
                return _error(reply)
            return {"id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}]}


def _error(status: int):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": "scripted failure", "type": "server_error"}}, status_code=status)


@pytest.fixture(scope="module")
def scripted_llm(serve_app):
    llm = ScriptedLLM()
    with serve_app(llm.app) as root_url:
        llm.url = f"{root_url}/v1"
        yield llm


def run_with_llm(incident, config: LlmConfig) -> dict:
    start, end = window(incident)
    return diagnose(incident.url, start, end, llm=config)


VERDICT = json.dumps({"root_cause": "prefill-0", "metric": "request_latency_seconds",
                      "explanation": "prefill-0 waits on its KV fetches; its latency tripled."})


def test_a_valid_llm_verdict_among_the_candidates_is_taken_after_its_queries(incident, scripted_llm):
    """Scripted endpoint: the LLM first runs one PromQL query, then picks the second
    statistical candidate. The agent runs the query against Prometheus, sends back the
    result, and takes the verdict because it names a candidate and explains itself."""
    query = 'sum by (instance_id) (cleave_prefill_running_requests{instance_id="prefill-0"})'
    scripted_llm.replies = [f'Let me look first.\n```json\n{{"query": {json.dumps(query)}}}\n```', VERDICT]
    scripted_llm.requests.clear()
    report = run_with_llm(incident, LlmConfig(scripted_llm.url))
    names = [c["component"] for c in report["candidates"]]
    assert "prefill-0" in names and names[0] == ROOT_CAUSE
    assert report["llm"]["accepted"] is True and report["statistics_only"] is False
    assert report["llm"]["model"] == "scripted" and report["llm"]["reason"] is None
    assert report["llm"]["verdict"]["component"] == "prefill-0"
    assert report["root_cause"]["component"] == "prefill-0" and report["root_cause"]["chosen_by"] == "llm"
    assert report["root_cause"]["metric"] == "request_latency_seconds"
    assert report["root_cause"]["explanation"].startswith("prefill-0 waits on its KV fetches")
    assert "LLM-confirmed" in report["summary"]
    [ran] = report["llm"]["queries"]
    assert ran["promql"] == query and '"instance_id": "prefill-0"' in ran["result"]
    [answered] = json.loads(ran["result"])
    assert answered["at_end"] > 0 and len(answered["over_window"]) == 8
    first, second = scripted_llm.requests
    assert first["model"] == "scripted" and first["temperature"] == 0
    brief = first["messages"][1]["content"]
    assert f"Candidates you may name: {', '.join(names)}." in brief
    assert "1. kvstore-0 (role kvstore" in brief and "   - transfer_latency_seconds: +" in brief
    assert "cleave_kvstore_transfer_seconds, " in brief and "cleave_prefill_request_seconds" in brief
    assert "cleave_kvstore_transfer_seconds" in report["context"]["metric_names"]
    assert second["messages"][-1]["content"].startswith(f"Result of {query}:")


@pytest.mark.parametrize("replies, timeout, reason", [
    (["The root cause is probably the network."], 30, "the answer is not a JSON object: 'The root cause is"),
    (['{"root_cause": "redis", "explanation": "Redis is slow."}'], 30, "the answer names 'redis', which is not among the candidates"),
    (['{"root_cause": "kvstore-0"}'], 30, "the answer has no explanation"),
    (['{"verdict": "kvstore-0"}'], 30, "the answer names no root_cause"),
    ([503], 30, "answered HTTP 503"),
    ([("sleep", 3.0)], 1, "timed out after 1 s"),
    (['{"query": "up"}'] * 5, 30, "asked for more than 2 queries without concluding"),
])
def test_an_unusable_llm_answer_leaves_the_statistical_ranking(incident, scripted_llm, replies, timeout, reason):
    """Scripted endpoint (see ScriptedLLM): one kind of unusable answer per case."""
    scripted_llm.replies = list(replies)
    report = run_with_llm(incident, LlmConfig(scripted_llm.url, timeout_seconds=timeout))
    assert report["llm"]["used"] is True and report["llm"]["accepted"] is False
    assert reason in report["llm"]["reason"], report["llm"]["reason"]
    assert report["statistics_only"] is True and report["llm"]["verdict"] is None
    assert report["root_cause"]["component"] == ROOT_CAUSE and report["root_cause"]["chosen_by"] == "statistics"
    assert len(report["llm"]["queries"]) == (2 if "queries" in reason else 0)


def test_a_quiet_window_has_no_root_cause_and_asks_no_llm(incident, scripted_llm):
    fault = incident.incident.fault
    scripted_llm.requests.clear()
    report = diagnose(incident.url, fault - 480, fault - 10, anomaly_time=fault - 200, llm=LlmConfig(scripted_llm.url))
    assert report["root_cause"] is None and report["candidates"] == [] and report["action"] is None
    assert report["summary"] == "no component deviates from its normal behaviour in the window"
    assert report["llm"]["used"] is False and report["llm"]["reason"] == "no candidate to investigate"
    assert scripted_llm.requests == [] and report["rankers"]["ours"]


def test_an_unreachable_llm_leaves_the_statistical_ranking(incident):
    port = free_port()
    report = run_with_llm(incident, LlmConfig(f"http://127.0.0.1:{port}/v1", timeout_seconds=5))
    assert report["llm"]["used"] is True and report["llm"]["accepted"] is False
    assert report["llm"]["reason"].startswith(f"the LLM at http://127.0.0.1:{port}/v1 cannot be reached")
    assert report["root_cause"]["component"] == ROOT_CAUSE and report["statistics_only"] is True


def test_a_real_cleave_server_as_the_llm(incident, smollm2_dir, serve_app):
    """The LLM is a Cleave server (the OpenAI front end on the real engine) serving
    SmolLM2-135M-Instruct. What a 135M model answers is its own; the test shows the request
    reaches it and that validation, not the model, decides what the report keeps."""
    from cleave.engine.async_engine import AsyncLLMEngine
    from cleave.engine.config import EngineConfig
    from cleave.models.tokenizer import Tokenizer
    from cleave.router.app import create_app

    engine = AsyncLLMEngine(EngineConfig(model=str(smollm2_dir), max_model_len=2048, num_kv_blocks=256,
                                         max_num_seqs=2, num_threads=1))
    app = create_app(engine, Tokenizer.from_pretrained(smollm2_dir), "smollm2", str(smollm2_dir),
                     instance_id="llm-under-test", start_engine=True)
    with serve_app(app) as root_url:
        report = run_with_llm(incident, LlmConfig(f"{root_url}/v1", max_tokens=64, max_queries=1,
                                                         timeout_seconds=300))
        served = httpx.get(f"{root_url}/metrics", timeout=10).text
    llm = report["llm"]
    assert llm["used"] is True and llm["model"] == "smollm2"
    assert 'cleave_router_requests_total{endpoint="chat_completions",outcome="success"}' in served
    names = [c["component"] for c in report["candidates"]]
    if llm["accepted"]:
        assert llm["verdict"]["component"] in names and report["root_cause"]["chosen_by"] == "llm"
    else:
        assert llm["reason"].startswith("the answer ") and report["root_cause"]["component"] == ROOT_CAUSE
        assert report["statistics_only"] is True


# -- cleave agent ------------------------------------------------------------------------------


class Agent:
    """``cleave agent`` as a process."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "cleave.cli", "agent", "--port", str(self.port), *flags],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not self._healthy():
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "cleave agent did not start"
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> tuple[int | None, list[dict]]:
        """SIGTERM; the exit code and the JSON log lines."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = None
        return code, [json.loads(line) for line in self.process.stderr.read().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def broker():
    port = free_port()
    process = subprocess.Popen(broker_argv("127.0.0.1", port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: port_in_use("127.0.0.1", port), 20), "the broker never listened"
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def agent(incident, module_redis_url, broker):
    agent = Agent("--prometheus-url", incident.url, "--redis-url", module_redis_url, "--events-bootstrap", broker,
                  "--llm-url", "", "--window-seconds", str(WINDOW))
    agent.redis_url, agent.bootstrap = module_redis_url, broker
    try:
        yield agent
    finally:
        agent.stop()


def plant_context(agent, start: float, end: float) -> None:
    """A registered instance and a scaling decision in Redis, request events on Kafka: two
    in the window (a failure and a resume) and one before it."""
    with redis.Redis.from_url(agent.redis_url) as client:
        Registry(client).register(InstanceRecord("kvstore", ROOT_CAUSE, "127.0.0.1:50060"), ttl=300)
        client.lpush("cleave:scaling:decisions", json.dumps({"ts": end - 60, "role": "decode", "from": 2, "to": 3}))
    registry = CollectorRegistry()
    publisher = EventPublisher(agent.bootstrap, registry=registry)
    publisher.publish(make_event("failed", "r1", "router", "router-0", error="KV fetch timed out", status=503)
                      | {"timestamp": end - 30})
    publisher.publish(make_event("resumed", "r2", "router", "router-0", from_instance_id="decode-0",
                                 to_instance_id="decode-1", num_generated=3) | {"timestamp": end - 20})
    publisher.publish(make_event("admitted", "r0", "router", "router-0") | {"timestamp": start - 100})
    try:
        assert wait_until(lambda: registry.get_sample_value("cleave_events_sent_total") == 3, 30)
    finally:
        publisher.close()


def test_agent_diagnoses_on_demand_and_publishes_to_redis_and_kafka(agent, incident):
    start, end = window(incident)
    plant_context(agent, start, end)
    response = httpx.post(f"{agent.url}/diagnoses", json={"start": start, "end": end}, timeout=120)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["root_cause"]["component"] == ROOT_CAUSE and report["trigger"]["kind"] == "api"
    assert report["llm"]["reason"] == DISABLED and report["errors"] == []
    context = report["context"]
    assert [(r["role"], r["instance_id"]) for r in context["registry"]] == [("kvstore", ROOT_CAUSE)]
    assert context["scaling_decisions"] == [{"ts": end - 60, "role": "decode", "from": 2, "to": 3}]
    assert context["events"]["count"] == 2 and context["events"]["by_type"] == {"failed": 1, "resumed": 1}
    assert [e["type"] for e in context["events"]["failed"]] == ["failed", "resumed"]
    assert context["events"]["failed"][0]["error"] == "KV fetch timed out"
    listed = httpx.get(f"{agent.url}/diagnoses", timeout=10).json()["diagnoses"]
    assert listed[0]["id"] == report["id"] and listed[0]["component"] == ROOT_CAUSE
    assert httpx.get(f"{agent.url}/diagnoses/{report['id']}", timeout=10).json() == report
    markdown = httpx.get(f"{agent.url}/diagnoses/{report['id']}", params={"format": "markdown"}, timeout=10)
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text.startswith(f"# Diagnosis {report['id']}")
    missing = httpx.get(f"{agent.url}/diagnoses/diag-nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # The dashboard's list: newest first, with the ts and summary it shows.
    with redis.Redis.from_url(agent.redis_url) as client:
        entry = json.loads(client.lindex(DIAGNOSES_KEY, 0))
    assert entry["id"] == report["id"] and entry["ts"] == report["ts"] and entry["summary"] == report["summary"]
    assert entry["report"] == f"{agent.url}/diagnoses/{report['id']}"
    published = next((e for e in tail(agent.bootstrap, DIAGNOSES_TOPIC, from_beginning=True, timeout=30)
                      if e.get("id") == report["id"]), None)
    assert published == report


def alert(name: str, starts: float) -> dict:
    return {"labels": {"alertname": name, "severity": "critical", "role": "router"},
            "annotations": {"summary": "TTFT over target"},
            "startsAt": datetime.fromtimestamp(starts, timezone.utc).isoformat().replace("+00:00", "Z")}


def test_alertmanager_webhook_triggers_one_diagnosis_per_alert(agent, incident, tmp_path):
    """A real Alertmanager, configured as `cleave up` configures it, delivers the alert."""
    port = free_port()
    config = write_yaml(tmp_path / "alertmanager.yml", alertmanager_config(f"{agent.url}/alerts"))
    manager = subprocess.Popen(
        ["prometheus-alertmanager", f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: port_in_use("127.0.0.1", port), 30)
        assert wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 30)
        fired = alert("CleaveTTFTFastBurn", incident.incident.fault + 60)
        assert httpx.post(f"{base}/api/v2/alerts", json=[fired], timeout=10).status_code == 200

        def alert_diagnoses() -> list[dict]:
            return [d for d in httpx.get(f"{agent.url}/diagnoses", timeout=10).json()["diagnoses"]
                    if d["trigger"] == "alert"]

        assert wait_until(lambda: len(alert_diagnoses()) == 1, 90, interval=0.5), "no diagnosis from the alert"
    finally:
        manager.terminate()
        manager.wait(20)
    [digest] = alert_diagnoses()
    report = httpx.get(digest["report"], timeout=10).json()
    assert report["trigger"]["alerts"] == ["CleaveTTFTFastBurn"]
    assert report["root_cause"]["component"] == ROOT_CAUSE
    assert report["window"]["end"] == incident.incident.fault + 60 + WINDOW / 4
    # Alertmanager repeats a firing alert; the agent diagnoses it once.
    repeat = {"version": "4", "status": "firing", "receiver": "cleave-agent",
              "alerts": [{**fired, "status": "firing", "fingerprint": report["trigger"]["fingerprints"][0].split("@")[0]}]}
    again = httpx.post(f"{agent.url}/alerts", json=repeat, timeout=60)
    assert again.status_code == 200 and again.json() == {"diagnoses": [], "skipped": {"duplicate": 1, "resolved": 0}}
    resolved = {**repeat, "alerts": [{**repeat["alerts"][0], "status": "resolved"}]}
    assert httpx.post(f"{agent.url}/alerts", json=resolved, timeout=60).json()["skipped"] == {"duplicate": 0, "resolved": 1}
    bad = httpx.post(f"{agent.url}/alerts", json={"nope": 1}, timeout=10)
    assert bad.status_code == 400 and "no 'alerts' list" in bad.json()["error"]["message"]
    assert len(alert_diagnoses()) == 1
    metrics = httpx.get(f"{agent.url}/metrics", timeout=10).text
    assert 'cleave_agent_alerts_total{result="duplicate"} 1.0' in metrics
    assert 'cleave_agent_diagnoses_total{outcome="statistics_only",trigger="alert"} 1.0' in metrics


def test_agent_without_prometheus_answers_503_with_the_reason(serve_app):
    from cleave.rca.service import AgentConfig, build_app

    port = free_port()
    app = build_app(AgentConfig(prometheus_url=f"http://127.0.0.1:{port}", redis_url="", llm_url=""))
    with serve_app(app) as url:
        response = httpx.post(f"{url}/diagnoses", json={}, timeout=60)
        hook = httpx.post(f"{url}/alerts", json={"alerts": [{**alert("X", time.time()), "status": "firing"}]}, timeout=60)
        listed = httpx.get(f"{url}/diagnoses", timeout=10).json()
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "prometheus_unavailable"
    assert error["message"].startswith(f"no diagnosis: Prometheus at http://127.0.0.1:{port} cannot be read")
    assert hook.status_code == 503 and listed == {"diagnoses": []}


def test_scheduled_diagnosis_then_sigterm_with_json_logs(incident):
    agent = Agent("--prometheus-url", incident.url, "--redis-url", "", "--llm-url", "", "--interval-seconds", "1")

    def scheduled() -> list[dict]:
        return [d for d in httpx.get(f"{agent.url}/diagnoses", timeout=10).json()["diagnoses"]
                if d["trigger"] == "schedule"]

    try:
        assert wait_until(lambda: len(scheduled()) >= 1, 60, interval=0.2), "no scheduled diagnosis"
        assert scheduled()[-1]["component"] == ROOT_CAUSE
    finally:
        code, logs = agent.stop()
    # uvicorn finishes its shutdown, then lets the signal it caught end the process.
    assert code == -signal.SIGTERM
    assert any(line["msg"] == "Application shutdown complete." for line in logs)
    done = [line for line in logs if line.get("msg") == "diagnosis"]
    assert done and done[0]["level"] == "info" and done[0]["summary"].startswith("kvstore-0")
    assert done[0]["trigger"] == "schedule"


def test_diagnose_publish_pushes_the_digest_and_the_report(agent, incident):
    result = cleave("diagnose", "--prometheus-url", incident.url, "--end", str(window(incident)[1]), "--no-llm",
                    "--json", "--quiet", "--publish", "--redis-url", agent.redis_url,
                    "--events-bootstrap", agent.bootstrap)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert report["trigger"]["kind"] == "cli"
    with redis.Redis.from_url(agent.redis_url) as client:
        entry = json.loads(client.lindex(DIAGNOSES_KEY, 0))
    assert entry == {"ts": report["ts"], "summary": report["summary"], "id": report["id"], "component": ROOT_CAUSE,
                     "metric": report["root_cause"]["metric"], "chosen_by": "statistics", "trigger": "cli"}
    published = next((e for e in tail(agent.bootstrap, DIAGNOSES_TOPIC, from_beginning=True, timeout=30)
                      if e.get("id") == report["id"]), None)
    assert published == report


def test_cleave_up_runs_the_agent_after_prometheus_and_points_alertmanager_at_it(tmp_path, monkeypatch):
    from cleave.launcher import build_parser
    from cleave.observability.prometheus import prometheus_tiers
    from cleave.rca.service import agent_tiers

    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    ports = [str(free_port()) for _ in range(3)]
    flags = ["--prometheus-port", ports[0], "--alertmanager-port", ports[1], "--agent-port", ports[2]]
    args, _ = build_parser("up").parse_known_args([*flags, "--port", "8123", "--served-model-name", "m"])
    [[agent]] = agent_tiers(args)
    argv = agent.argv[agent.argv.index("agent") + 1:]
    assert dict(zip(argv[::2], argv[1::2])) == {
        "--host": "127.0.0.1", "--port": ports[2], "--prometheus-url": f"http://127.0.0.1:{ports[0]}",
        "--redis-url": "redis://127.0.0.1:6390/0", "--events-bootstrap": "127.0.0.1:9092",
        "--llm-url": "http://127.0.0.1:8123/v1", "--llm-model": "m"}
    assert agent.health_url == f"http://127.0.0.1:{ports[2]}/health"
    prometheus_tiers(args)
    config = tmp_path / "prometheus" / "alertmanager.yml"
    checked = subprocess.run(["amtool", "check-config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"url: http://127.0.0.1:{ports[2]}/alerts" in config.read_text()
    assert f"- 127.0.0.1:{ports[2]}" in (tmp_path / "prometheus" / "prometheus.yml").read_text()
    for off in (["--no-agent"], ["--no-prometheus"]):
        args, _ = build_parser("up").parse_known_args([*flags, *off])
        assert agent_tiers(args) == []
    args, _ = build_parser("up").parse_known_args([*flags, "--no-agent"])
    prometheus_tiers(args)
    assert yaml.safe_load(config.read_text())["receivers"] == [{"name": "null"}]
