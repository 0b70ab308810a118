"""The ops agent's pipeline: :func:`diagnose` reads a window of the platform's metrics from
Prometheus, finds the anomaly time (or takes it), ranks components with ``ours`` (``baro``
and ``nsigma`` beside it), gathers evidence and context for the top candidates, lets an
LLM investigate them and writes the report (:mod:`cleave.rca.report`).

Statistics decide what the candidates are: components with a series at least
``EVIDENCE_SCALES`` from normal. The LLM may only pick one of them; when it is off,
unreachable or answers anything else the first candidate stands and the report says why.
:func:`publish` puts a report where others find it: a digest on the Redis list
``cleave:diagnoses`` (the dashboard) and the whole report on Kafka ``cleave.diagnoses.v1``."""

from __future__ import annotations

import json
import re
import time
import warnings
from typing import Any, Callable

import numpy as np

from cleave.observability.prometheus_api import PrometheusUnavailable
from cleave.rca import report as reports
from cleave.rca.changepoint import detect_anomaly_time
from cleave.rca.llm import LlmConfig, investigate
from cleave.rca.platform import PlatformData, collect
from cleave.rca.rankers import RANKERS, ComponentScore, metric_kind
from cleave.rca.timeseries import MetricsError
from cleave.rca.tools import Tools

DIAGNOSES_TOPIC = "cleave.diagnoses.v1"
EVIDENCE_SCALES = 5.0
NUM_RANKED = 5
QUERY_RESULT_CHARS = 1500
DISABLED = "disabled (--no-llm, or an empty --llm-url)"

Progress = Callable[[str], None]


class DiagnosisError(RuntimeError):
    """No diagnosis can be made (Prometheus away, no data); the message says why."""


def _column_stats(data: PlatformData, name: str, anomaly_time: float) -> tuple[float | None, float | None]:
    """``(normal, peak)`` of a series: its median before the anomaly and its value after it
    that is farthest from that median."""
    table = data.table
    column = table.values[:, table.names.index(name)]
    before, after = column[table.time < anomaly_time], column[table.time >= anomaly_time]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        normal = float(np.nanmedian(before)) if np.isfinite(before).any() else None
    finite = after[np.isfinite(after)]
    if not len(finite):
        return normal, None
    peak = float(finite[np.argmax(np.abs(finite - (normal or 0.0)))])
    return normal, peak


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not np.isfinite(value) else float(f"{value:.{digits}g}")


def candidate_entries(ranking: list[ComponentScore], data: PlatformData, anomaly_time: float,
                      top_k: int) -> list[dict[str, Any]]:
    """The first ``top_k`` components of ``ranking`` whose best series is at least
    ``EVIDENCE_SCALES`` off, with those of their series that are (the ranker's top three)."""
    out = []
    for comp in ranking:
        if len(out) >= top_k:
            break
        if not comp.evidence or comp.evidence[0].score < EVIDENCE_SCALES:
            continue
        evidence = []
        for e in (e for e in comp.evidence if e.score >= EVIDENCE_SCALES):
            normal, peak = _column_stats(data, e.name, anomaly_time)
            evidence.append({"series": e.name, "metric": e.metric, "kind": metric_kind(e.metric),
                             "score": _rounded(e.score, 4), "deviation": _rounded(e.deviation, 4), "onset": e.onset,
                             "normal": _rounded(normal), "peak": _rounded(peak), "promql": data.promql.get(e.name)})
        kind = evidence[0]["kind"]
        out.append({"rank": len(out) + 1, "component": comp.component, "role": reports.role_of(comp.component),
                    "score": _rounded(comp.score, 4), "action": reports.suggested_action(comp.component, kind),
                    "evidence": evidence})
    return out


def statistical_explanation(candidate: dict[str, Any], candidates: list[dict[str, Any]]) -> str:
    top = candidate["evidence"][0]
    direction = "rose" if (top["deviation"] or 0) >= 0 else "fell"
    text = (f"{candidate['component']}'s {top['metric']} {direction} {abs(top['deviation'] or 0):.1f} scales "
            f"from its normal ({top['normal']} -> {top['peak']})")
    if top["onset"] is not None:
        text += f" from {reports.iso(top['onset'])}"
    others = [c["component"] for c in candidates if c is not candidate]
    if others:
        text += f"; it ranks above {', '.join(others)}, which also deviate"
    return text + "."


def timeline(candidates: list[dict[str, Any]], anomaly_time: float, detected: bool) -> list[dict[str, Any]]:
    entries = [{"time": anomaly_time, "component": "-",
                "what": "anomaly time (" + ("detected change point" if detected else "given") + ")"}]
    for cand in candidates:
        for e in cand["evidence"]:
            if e["onset"] is not None and e["score"] >= EVIDENCE_SCALES:
                direction = "up" if (e["deviation"] or 0) >= 0 else "down"
                entries.append({"time": e["onset"], "component": cand["component"],
                                "what": f"{e['metric']} {direction} {abs(e['deviation']):.1f} scales"})
    return sorted(entries, key=lambda e: (e["time"], e["component"]))


def candidate_metric_names(tools: Tools, candidates: list[dict[str, Any]], limit: int = 40) -> list[str]:
    """The metrics Prometheus holds for the candidates' roles (``cleave_<role>_...``), for the
    LLM to write its queries with; at most ``limit``, histograms named once."""
    prefixes = tuple(f"cleave_{c['role']}_" for c in candidates)
    try:
        names = tools.metric_names()
    except PrometheusUnavailable as exc:
        tools.errors.append(f"metric names: {exc}")
        return []
    bases = dict.fromkeys(re.sub(r"_(bucket|sum|count)$", "", n) for n in names if n.startswith(prefixes))
    return list(bases)[:limit]


def llm_brief(candidates: list[dict[str, Any]], context: dict[str, Any], anomaly_time: float,
              trigger: dict[str, Any]) -> str:
    """What the LLM is told: the candidates and their evidence, and the platform's context."""
    lines = [f"Anomaly at {reports.iso(anomaly_time)}."]
    if trigger.get("alerts"):
        lines.append(f"Firing alerts: {', '.join(trigger['alerts'])}.")
    # The evidence's PromQL stays out: it would triple the prompt, and small models lose
    # the question in it. The LLM writes its own queries from the metric names.
    lines.append("Candidates (statistical rank, score; evidence: metric, deviation in scales, normal -> peak, onset):")
    for cand in candidates:
        lines.append(f"{cand['rank']}. {cand['component']} (role {cand['role']}, score {cand['score']})")
        for e in cand["evidence"]:
            lines.append(f"   - {e['metric']}: {e['deviation']:+.1f}, {e['normal']} -> {e['peak']}, "
                         f"onset {reports.iso(e['onset']) or '-'}")
    lines.append('Metrics are labelled instance_id, e.g. cleave_kvstore_transfer_seconds_sum{instance_id="kvstore-0"}'
                 + (f"; those of the candidates' roles: {', '.join(context['metric_names'])}."
                    if context.get("metric_names") else "."))
    registry = context.get("registry") or []
    if registry:
        lines.append("Registered instances: " + ", ".join(
            f"{r['instance_id']} (heartbeat {r['heartbeat_age_seconds']} s ago)" for r in registry))
    events = context.get("events") or {}
    if events.get("count"):
        lines.append(f"Request events in the window: {json.dumps(events['by_type'])}; "
                     f"failures: {json.dumps(events['failed'][-5:])}")
    if context.get("scaling_decisions"):
        lines.append(f"Recent scaling decisions: {json.dumps(context['scaling_decisions'][:3])}")
    lines.append(f"Candidates you may name: {', '.join(c['component'] for c in candidates)}.")
    return "\n".join(lines)


def query_tool(tools: Tools, start: float, end: float, points: int = 8) -> Callable[[str], str]:
    """What the LLM's ``{"query": ...}`` runs: the instant value at the window's end and
    ``points`` values over the window, per series, as compact JSON."""
    step = max((end - start) / (points - 1), 1.0)

    def run(promql: str) -> str:
        try:
            now = tools.instant(promql, end)
            over = tools.range(promql, start, end, step)
        except PrometheusUnavailable as exc:
            return f"error: {exc}"[:QUERY_RESULT_CHARS]
        series = {json.dumps(s["labels"], sort_keys=True): {"labels": s["labels"], "at_end": s["value"]} for s in now}
        for s in over:
            entry = series.setdefault(json.dumps(s["labels"], sort_keys=True), {"labels": s["labels"], "at_end": None})
            entry["over_window"] = [[reports.iso(t), _rounded(v, 4)] for t, v in s["values"]]
        for entry in series.values():
            entry["at_end"] = _rounded(entry["at_end"], 4)
        return json.dumps(list(series.values()))[:QUERY_RESULT_CHARS]

    return run


def llm_section(llm: LlmConfig | None, candidates: list[dict[str, Any]], brief: str,
                run_query: Callable[[str], str], say: Progress) -> dict[str, Any]:
    """The report's ``llm`` section: not asked (off, or nothing to choose from), or its answer."""
    if llm is None or not candidates:
        return {"used": False, "url": llm and llm.url, "model": (llm and llm.model) or None, "accepted": False,
                "verdict": None, "reason": DISABLED if llm is None else "no candidate to investigate", "queries": []}
    names = [c["component"] for c in candidates]
    say(f"asking the LLM at {llm.url} to investigate {', '.join(names)}")
    section = investigate(llm, brief, names, run_query)
    say(f"  LLM {'chose ' + section['verdict']['component'] if section['accepted'] else 'not used: ' + section['reason']}")
    return section


def root_cause_entry(candidates: list[dict[str, Any]], section: dict[str, Any]) -> dict[str, Any] | None:
    """The LLM's accepted choice, else the first candidate; None without candidates. The
    metric is the one the LLM named if it is among the candidate's evidence."""
    if not candidates:
        return None
    verdict = section["verdict"] if section["accepted"] else None
    chosen = next(c for c in candidates if c["component"] == verdict["component"]) if verdict else candidates[0]
    top = next((e for e in chosen["evidence"] if verdict and e["metric"] == verdict.get("metric")),
               chosen["evidence"][0])
    return {"component": chosen["component"], "role": chosen["role"], "metric": top["metric"],
            "series": top["series"], "kind": top["kind"], "score": chosen["score"], "onset": top["onset"],
            "promql": top["promql"], "chosen_by": "llm" if verdict else "statistics",
            "explanation": verdict["explanation"] if verdict else statistical_explanation(chosen, candidates)}


def diagnose(prometheus_url: str, start: float, end: float, step: float = 2.0, *,
             anomaly_time: float | None = None, llm: LlmConfig | None = None, redis_url: str = "",
             events_bootstrap: str = "", trigger: dict[str, Any] | None = None, top_k: int = 3,
             progress: Progress | None = None, timeout: float = 10.0) -> reports.Report:
    """One diagnosis of ``[start, end]``; raises :class:`DiagnosisError` when none can be made."""
    say = progress or (lambda _: None)
    trigger = {"kind": "api", "alerts": [], "detail": "", **(trigger or {})}
    created = time.time()
    say(f"reading metrics from Prometheus at {prometheus_url} ({end - start:.0f} s window, {step:g} s step)")
    try:
        data = collect(prometheus_url, start, end, step, timeout=timeout)
    except PrometheusUnavailable as exc:
        raise DiagnosisError(str(exc)) from None
    except ValueError as exc:
        raise DiagnosisError(f"no metrics to diagnose: {exc}") from None
    table = data.table
    say(f"  {table.num_series} series of {len(data.roles)} components, {len(table.time)} rows")
    detected = anomaly_time is None
    try:
        t = detect_anomaly_time(table) if detected else float(anomaly_time)
    except MetricsError as exc:
        raise DiagnosisError(str(exc)) from None
    if not table.time[0] < t <= table.time[-1]:
        raise DiagnosisError(f"anomaly time {t:.0f} leaves no normal rows before it or is outside the window "
                             f"({table.time[0]:.0f}..{table.time[-1]:.0f})")
    say(f"anomaly time {reports.iso(t)} ({'detected' if detected else 'given'})")
    rankings = {name: RANKERS[name](table, t, data.graph) for name in ("ours", "baro", "nsigma")}
    candidates = candidate_entries(rankings["ours"], data, t, top_k)
    say("ranked: " + (", ".join(f"{c['component']} {c['score']:.1f}" for c in candidates) or "no component deviates"))
    tools = Tools(prometheus_url, redis_url, events_bootstrap, timeout=timeout)
    say("reading the registry, scaling decisions and request events")
    context = {"registry": tools.registry(), "scaling_decisions": tools.scaling_decisions(),
               "events": tools.recent_events(start, end)}
    context["metric_names"] = candidate_metric_names(tools, candidates) if candidates else []
    section = llm_section(llm, candidates, llm_brief(candidates, context, t, trigger), query_tool(tools, start, end), say)
    root = root_cause_entry(candidates, section)
    out: reports.Report = {
        "schema_version": reports.SCHEMA_VERSION, "id": reports.new_id(created), "ts": round(created, 3),
        "created": reports.iso(created), "summary": "", "trigger": trigger, "prometheus_url": prometheus_url,
        "window": {"start": start, "end": end, "step": step, "rows": len(table.time), "series": table.num_series},
        "anomaly_time": t, "anomaly_time_detected": detected, "root_cause": root,
        "action": reports.suggested_action(root["component"], root["kind"]) if root else None,
        "candidates": candidates,
        "rankers": {name: [{"component": c.component, "score": _rounded(c.score, 4)} for c in ranked[:NUM_RANKED]]
                    for name, ranked in rankings.items()},
        "timeline": timeline(candidates, t, detected), "context": context, "llm": section,
        "statistics_only": not section["accepted"], "errors": tools.errors,
    }
    out["summary"] = reports.summary_line(out)
    say(f"root cause: {out['summary']}")
    return out


def digest(report: reports.Report, link: str = "") -> dict[str, Any]:
    """The Redis list entry: what the dashboard shows of a report (docs/observability.md)."""
    cause = report.get("root_cause") or {}
    entry = {"ts": report["ts"], "summary": report["summary"], "id": report["id"],
             "component": cause.get("component"), "metric": cause.get("metric"), "chosen_by": cause.get("chosen_by"),
             "trigger": report["trigger"]["kind"]}
    if link:
        entry["report"] = link
    return entry


