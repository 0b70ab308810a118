"""cleave.rca.platform without a platform: the Prometheus API client's answers and errors,
and collect() turning range queries into a metric table, a call graph and PromQL, against
a fake Prometheus that answers from canned series."""

from __future__ import annotations

import subprocess
from string import Template
from typing import Any

import numpy as np
import pytest
import yaml

from cleave.rca.platform import SERIES, PrometheusAPI, PrometheusUnavailable, call_graph, collect
from fake_http import FakeJSONServer
from local_platform import free_port
from test_alert_rules import promtool

START, STEP = 1000.0, 2.0
ROLES = {"router-0": "router", "prefill-0": "prefill", "decode-0": "decode", "kvstore-0": "kvstore",
         "expert-0": "expert", "expert-1": "expert"}


def up_series() -> list[dict[str, Any]]:
    """Every target up at every step but kvstore-0, whose target is gone from t=1010 on."""
    out = []
    for instance, role in ROLES.items():
        last = 1008.0 if instance == "kvstore-0" else 1020.0
        out.append({"metric": {"instance_id": instance, "role": role},
                    "values": [[t, "1"] for t in np.arange(START, last + 1, STEP)]})
    return out


class FakePrometheus(FakeJSONServer):
    def __init__(self) -> None:
        self.queries: list[str] = []
        super().__init__(self.respond)

    def respond(self, path: str, params: dict[str, list[str]]) -> tuple[int, Any]:
        query = params.get("query", [""])[0]
        self.queries.append(query)
        body: dict[str, Any] = {"status": "success", "data": {"resultType": "matrix", "result": []}}
        if "syntax error" in query:
            return 400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 1"}
        if path.endswith("/label/instance_id/values"):
            body["data"] = sorted(ROLES)
        elif query.startswith("min by (instance_id, role) (min_over_time(up"):
            body["data"]["result"] = up_series()
        elif "cleave_router_time_to_first_token_seconds_sum" in query:
            body["data"]["result"] = [{"metric": {"instance_id": "router-0"},
                                       "values": [[1004, "0.5"], [1006.001, "0.7"], [1100, "9"]]}]
        elif "cleave_expert_client_call_seconds_sum" in query:
            body["data"]["result"] = [{"metric": {"replica": "expert-1"}, "values": [[1000, "0.01"]]}]
        elif "cleave_redis_command_seconds_sum" in query:
            body["data"]["result"] = [{"metric": {}, "values": [[1000, "0.001"]]}]
        elif path.endswith("/query"):
            body["data"] = {"resultType": "vector", "result": [
                {"metric": {"a": "1"}, "value": [1, "2"]}, {"metric": {"a": "2"}, "value": [1, "NaN"]}]}
        return 200, body


def test_client_answers_and_raises_one_exception_type():
    with FakePrometheus() as prometheus:
        api = PrometheusAPI(prometheus.url)
        assert api.query_value("sum(x)") == 2.0
        assert api.label_values("instance_id", match="up") == sorted(ROLES)
        with pytest.raises(PrometheusUnavailable, match="bad_data.*parse error"):
            api.query("syntax error(")
    with pytest.raises(PrometheusUnavailable, match="cannot be read"):
        PrometheusAPI(f"http://127.0.0.1:{free_port()}", timeout=2).query("up")


def test_collect_builds_table_graph_and_promql():
    with FakePrometheus() as prometheus:
        data = collect(prometheus.url, START, 1020.0, STEP)
    table = data.table
    assert list(table.time) == [START + STEP * i for i in range(11)]
    ttft = table.values[:, table.names.index("router-0_ttft_seconds")]
    # Samples land on the nearest step; one outside the range is dropped.
    assert ttft[2] == 0.5 and ttft[3] == 0.7 and np.isnan(ttft[[0, 1, 4, 10]]).all()
    kv_up = table.values[:, table.names.index("kvstore-0_up")]
    assert list(kv_up) == [1.0] * 5 + [0.0] * 6  # a target gone from discovery is down
    assert "redis_command_latency_seconds" in table.names and data.roles["redis"] == "redis"
    assert data.graph["router-0"] == {"prefill-0", "decode-0", "redis"}
    assert data.graph["decode-0"] == {"kvstore-0", "expert-0", "expert-1", "redis"}
    assert data.graph["kvstore-0"] == {"redis"} and data.graph["redis"] == set()
    assert set(data.promql) == set(table.names)
    # A callee's latency as its callers measure it is the callee's series.
    assert table.values[0, table.names.index("expert-1_client_latency_seconds")] == 0.01
    assert 'replica="expert-1"' in data.promql["expert-1_client_latency_seconds"]
    assert data.promql["router-0_ttft_seconds"] == (
        'sum by (instance_id) (rate(cleave_router_time_to_first_token_seconds_sum{job="cleave",instance_id="router-0"}[10s]))'
        ' / sum by (instance_id) (rate(cleave_router_time_to_first_token_seconds_count{job="cleave",instance_id="router-0"}[10s]))')
    assert all("$" not in q for q in prometheus.queries)


def test_collect_without_targets_or_prometheus_says_why():
    with pytest.raises(PrometheusUnavailable):
        collect(f"http://127.0.0.1:{free_port()}", START, 1020.0, STEP, timeout=2)
    with pytest.raises(ValueError, match="start < end"):
        collect("http://127.0.0.1:1", 1020.0, START, STEP)


def test_call_graph_from_roles():
    assert call_graph({"router-0": "router", "decode-0": "decode"}) == {
        "router-0": {"decode-0", "redis"}, "decode-0": {"redis"}, "redis": set()}


def test_a_callees_latency_is_its_slowest_operation_as_the_least_hit_caller_of_a_role_sees_it(tmp_path):
    """The KV store's and an expert replica's latency as their callers see it, evaluated by
    Prometheus' own engine (``promtool test rules``) over counters rising at fixed rates.
    kvstore-0 and kvstore-2 are throttled by a stop/continue cycle, which the first call of a
    request pays for: kvstore-0's prefill reads wait 0.2 s while its puts, and the decode
    workers' reads, land in the running slice (2-3 ms); kvstore-2's prefill worker asks no
    read first, so its puts wait. Both read 0.2 s (the least over every caller of an
    operation read 3 ms for kvstore-0, a decode worker's reads hiding the prefill worker's).
    kvstore-1 is fine, with one overloaded decode worker whose reads look slow: the other
    decode worker's 2 ms reads and the prefill worker's 3 ms puts rule. An expert replica
    (no ``op``) reads as its least-hit caller of any role."""
    queries = {(q.metric, q.roles): q.expr for q in SERIES}
    per_minute = {  # (store label, caller, op): (calls, seconds) a minute
        ("kvstore-0", "prefill-0", "get"): (6, 1.2), ("kvstore-0", "prefill-0", "put"): (6, 0.018),
        ("kvstore-0", "decode-0", "get"): (6, 0.012), ("kvstore-0", "decode-1", "get"): (6, 0.012),
        ("kvstore-1", "prefill-0", "put"): (6, 0.018), ("kvstore-1", "prefill-0", "get"): (6, 0.012),
        ("kvstore-1", "decode-0", "get"): (12, 2.4), ("kvstore-1", "decode-1", "get"): (12, 0.024),
        ("kvstore-2", "prefill-0", "put"): (6, 1.2), ("kvstore-2", "decode-0", "get"): (12, 0.024),
    }
    series = []
    for (store, caller, op), (calls, seconds) in per_minute.items():
        role = caller.split("-")[0]
        labels = f'job="cleave",instance_id="{caller}",role="{role}",store="{store}",op="{op}"'
        series.append({"series": f"cleave_kvstore_client_call_seconds_sum{{{labels}}}", "values": f"0+{seconds}x10"})
        series.append({"series": f"cleave_kvstore_client_call_seconds_count{{{labels}}}", "values": f"0+{calls}x10"})
        # Every call of a mean above 5 ms lands in (5 ms, 250 ms], the others in the first bucket.
        slow = seconds / calls > 0.005
        for le, count in (("0.005", 0 if slow else calls), ("0.25", calls), ("+Inf", calls)):
            series.append({"series": f'cleave_kvstore_client_call_seconds_bucket{{{labels},le="{le}"}}',
                           "values": f"0+{count}x10"})
    for caller, (calls, seconds) in {"decode-0": (12, 0.048), "prefill-0": (6, 0.3)}.items():
        labels = f'job="cleave",instance_id="{caller}",role="{caller.split("-")[0]}",replica="expert-0"'
        series.append({"series": f"cleave_expert_client_call_seconds_sum{{{labels}}}", "values": f"0+{seconds}x10"})
        series.append({"series": f"cleave_expert_client_call_seconds_count{{{labels}}}", "values": f"0+{calls}x10"})

    def expr(metric: str, role: str) -> str:
        """The series' PromQL, in whole microseconds (promtool compares floats exactly)."""
        promql = Template(queries[metric, (role,)]).substitute(sel='job="cleave"', w="3m", f="1m")
        return f"round(1e6 * ({promql}))"

    tests = [
        {"expr": expr("client_latency_seconds", "kvstore"), "eval_time": "10m", "exp_samples": [
            {"labels": '{store="kvstore-0"}', "value": 200000}, {"labels": '{store="kvstore-1"}', "value": 3000},
            {"labels": '{store="kvstore-2"}', "value": 200000}]},
        # histogram_quantile interpolates within a bucket: 0.005 + 0.9 * (0.25 - 0.005) for the puts.
        {"expr": expr("client_latency_p90_seconds", "kvstore"), "eval_time": "10m", "exp_samples": [
            {"labels": '{store="kvstore-0"}', "value": 225500}, {"labels": '{store="kvstore-1"}', "value": 4500},
            {"labels": '{store="kvstore-2"}', "value": 225500}]},
        {"expr": expr("client_latency_seconds", "expert"), "eval_time": "10m", "exp_samples": [
            {"labels": '{replica="expert-0"}', "value": 4000}]},
    ]
    spec = {"rule_files": [], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}
    (tmp_path / "callers_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", "callers_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
