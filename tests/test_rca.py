"""The RCA analysis core: rankers on planted faults, change points, CSV input, the metric
definitions and the evaluation on a few real cases of each labelled dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cleave.cli import main
from cleave.rca import datasets
from cleave.rca.changepoint import detect_anomaly_time
from cleave.rca.evaluate import evaluate_cases
from cleave.rca.metrics import ac_at_k, avg_at_k
from cleave.rca.rankers import RANKERS, baro, metric_kind, nsigma, ours
from cleave.rca.timeseries import MetricsError, MetricTable, load_csv, split_name

REPO = Path(__file__).resolve().parents[1]
T0, STEP, N, FAULT_AT = 1_700_000_000.0, 60.0, 40, 30


def synthetic(faults: dict[str, float], onset: dict[str, int] | None = None, seed: int = 0) -> MetricTable:
    """Components a, b, c (each latency + cpu), noise ~1%; ``faults`` multiplies a series
    from row ``onset`` (default FAULT_AT)."""
    rng = np.random.default_rng(seed)
    names = [f"{c}_{m}" for c in ("a", "b", "c") for m in ("latency", "cpu")]
    values = 10.0 * (1 + 0.01 * rng.standard_normal((N, len(names))))
    for name, factor in faults.items():
        start = (onset or {}).get(name, FAULT_AT)
        values[start:, names.index(name)] *= factor
    return MetricTable(T0 + STEP * np.arange(N), names, values)


@pytest.mark.parametrize("ranker", sorted(RANKERS))
@pytest.mark.parametrize("series", ["a_cpu", "b_latency", "c_cpu"])
def test_planted_fault_ranked_first(ranker, series):
    table = synthetic({series: 3.0})
    ranking = RANKERS[ranker](table, T0 + STEP * FAULT_AT)
    assert ranking[0].component == series.split("_")[0]
    assert ranking[0].evidence[0].name == series
    assert ranking[0].evidence[0].onset == T0 + STEP * FAULT_AT


def test_propagated_latency_does_not_outrank_callee():
    # a calls b; b's latency doubles, a's latency (which includes b's) triples.
    table = synthetic({"b_latency": 2.0, "a_latency": 3.0})
    graph = {"a": {"b"}}
    t = T0 + STEP * FAULT_AT
    assert baro(table, t)[0].component == "a"
    assert nsigma(table, t)[0].component == "a"
    ranking = ours(table, t, graph)
    assert [c.component for c in ranking[:2]] == ["b", "a"]


def test_a_stopped_caller_is_not_explained_by_its_callee():
    # a is stopped: its scrapes fail (up 1 -> 0) and its latency series go silent; b, which a
    # calls, answers the remaining callers a little slower. b's rise must not discount a's
    # own liveness as if a only waited on b.
    table = synthetic({"b_latency": 4.0})
    up = np.ones(N)
    up[FAULT_AT:] = 0.0
    latency = table.values[:, table.names.index("a_latency")].copy()
    latency[FAULT_AT:] = np.nan
    names = [n for n in table.names if n != "a_latency"] + ["a_up", "a_latency"]
    values = np.column_stack([table.values[:, table.names.index(n)] for n in names[:-2]] + [up, latency])
    ranking = ours(MetricTable(table.time, names, values), T0 + STEP * FAULT_AT, {"a": {"b"}})
    assert ranking[0].component == "a" and ranking[0].evidence[0].name == "a_up"


def test_temporal_precedence_breaks_a_tie():
    table = synthetic({"a_cpu": 3.0, "c_cpu": 3.0}, onset={"a_cpu": FAULT_AT + 3})
    assert ours(table, T0 + STEP * FAULT_AT)[0].component == "c"


def test_metric_kinds():
    assert metric_kind("PodServerLatencyP90(s)") == "latency"
    assert metric_kind("latency-p99") == "latency"
    assert metric_kind("availability-Average") == "errors"
    assert metric_kind("CpuUsageRate(%)") == "resource"
    assert metric_kind("requests-Sum") == "traffic"
    assert metric_kind("up") == "errors" and metric_kind("upstream_bytes") == "traffic"


def test_change_point_finds_planted_shift():
    table = synthetic({"a_cpu": 2.0, "b_latency": 1.5})
    assert detect_anomaly_time(table) == T0 + STEP * FAULT_AT


def test_change_point_needs_rows():
    with pytest.raises(MetricsError, match="too few"):
        detect_anomaly_time(MetricTable([1.0, 2.0, 3.0], ["a_x"], [[1.0], [2.0], [3.0]]))


def test_split_name():
    assert split_name("frontend_CpuUsageRate(%)") == ("frontend", "CpuUsageRate(%)")
    assert split_name("payforadoption_AWS::ECS::Container_latency-p99", "last") == (
        "payforadoption_AWS::ECS::Container", "latency-p99")
    assert split_name("kv-store__hit_rate", "__") == ("kv-store", "hit_rate")
    with pytest.raises(MetricsError):
        split_name("nounderscore")


def test_csv_round_trip(tmp_path):
    table = synthetic({})
    table.values[3, 1] = np.nan
    path = tmp_path / "m.csv"
    table.to_csv(path)
    loaded = load_csv(path)
    assert loaded.names == table.names and loaded.components == ["a", "a", "b", "b", "c", "c"]
    np.testing.assert_allclose(loaded.time, table.time)
    np.testing.assert_allclose(loaded.values, table.values)


@pytest.mark.parametrize("text, message", [
    ("when,a_x\n1,2\n2,3\n3,4\n", "no 'time' column"),
    ("time,a_x\n1,2\n2,oops\n3,4\n", "non-numeric value 'oops'"),
    ("time\n1\n2\n3\n", "no series columns"),
    ("time,a_x\n1,2\n", "at least 3"),
    ("time,ax\n1,2\n2,3\n3,4\n", "not <component>_<metric>"),
])
def test_bad_csv(tmp_path, capsys, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(MetricsError, match=message):
        load_csv(path)
    assert main(["rca", "--metrics", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_file_and_bad_time(tmp_path, capsys):
    assert main(["rca", "--metrics", str(tmp_path / "absent.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    path = tmp_path / "m.csv"
    synthetic({"b_cpu": 3.0}).to_csv(path)
    assert main(["rca", "--metrics", str(path), "--anomaly-time", "1"]) == 2
    assert "outside the data" in capsys.readouterr().err


def test_cli_ranking(tmp_path, capsys):
    path = tmp_path / "m.csv"
    synthetic({"b_cpu": 3.0}).to_csv(path)
    assert main(["rca", "--metrics", str(path), "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["anomaly_time_detected"] and out["anomaly_time"] == T0 + STEP * FAULT_AT
    assert [c["component"] for c in out["ranking"]][0] == "b" and len(out["ranking"]) == 2
    assert out["ranking"][0]["evidence"][0]["series"] == "b_cpu"
    assert main(["rca", "--metrics", str(path), "--anomaly-time", str(T0 + STEP * FAULT_AT),
                 "--ranker", "baro"]) == 0
    text = capsys.readouterr().out
    assert " 1. b " in text and "b_cpu" not in text and "cpu" in text and "given" in text


def test_metric_definitions():
    rankings = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"], ["d", "e", "f", "g", "h", "a"]]
    truths = ["a", "a", "a", "a"]
    assert ac_at_k(rankings, truths, 1) == 0.25
    assert ac_at_k(rankings, truths, 2) == 0.5
    assert ac_at_k(rankings, truths, 3) == 0.75
    assert ac_at_k(rankings, truths, 5) == 0.75
    assert avg_at_k(rankings, truths, 5) == pytest.approx((0.25 + 0.5 + 0.75 + 0.75 + 0.75) / 5)
    assert avg_at_k([["x"]], ["x"]) == 1.0
    with pytest.raises(ValueError):
        ac_at_k([["a"]], [], 1)


def _cases(name: str) -> list[datasets.RcaCase]:
    root = REPO / datasets.DEFAULT_ROOTS[name]
    if not root.is_dir():
        pytest.fail(f"the {name} dataset is missing: expected at {datasets.DEFAULT_ROOTS[name]} "
                    "relative to the repository root")
    return datasets.load(name, root)


@pytest.mark.parametrize("name, count, cases", [("nezha", 56, 10), ("petshop", 68, 5)])
def test_dataset_loaders_and_evaluation(name, count, cases):
    all_cases = _cases(name)
    assert len(all_cases) == count
    for case in all_cases:
        assert case.table.time[0] < case.anomaly_time <= case.table.time[-1]
        assert case.root_cause in case.table.components
        assert case.graph
    subset = all_cases[::len(all_cases) // cases][:cases]
    results = evaluate_cases(subset)
    assert set(results) == {"baro", "nsigma", "ours"}
    for r in results.values():
        assert r["cases"] == cases
        assert 0.0 <= r["ac@1"] <= r["ac@3"] <= 1.0 and 0.0 <= r["avg@5"] <= 1.0
        assert all(rank is None or rank >= 1 for rank in r["ranks"].values())


def test_dataset_missing_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(datasets.DatasetMissing, match="shared/datasets/rca/petshop"):
        datasets.load("petshop", tmp_path / "nowhere")
    assert main(["rca-eval", "--datasets", "nezha", "--nezha-root", str(tmp_path / "nowhere")]) == 2
    assert "nezha-online-boutique" in capsys.readouterr().err
    assert main(["rca-eval", "--datasets", "bogus"]) == 2


def test_rca_eval_command_on_a_subset(capsys):
    _cases("nezha"), _cases("petshop")
    assert main(["rca-eval", "--limit", "3", "--json",
                 "--nezha-root", str(REPO / datasets.DEFAULT_ROOTS["nezha"]),
                 "--petshop-root", str(REPO / datasets.DEFAULT_ROOTS["petshop"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"nezha", "petshop"} and out["nezha"]["ours"]["cases"] == 3
