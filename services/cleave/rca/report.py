"""The ops agent's diagnosis report: one JSON object (schema version 1, docs/rca.md
"Report schema") and its Markdown rendering.

The report is a plain dict so that what the REST API answers, what Redis and Kafka carry
and what ``cleave diagnose --json`` prints are byte for byte the same document. Fields are
only added within a version; renaming or removing one bumps ``schema_version``."""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = 1

Report = dict[str, Any]


def new_id(now: float | None = None) -> str:
    """``diag-<UTC yyyymmddThhmmss>-<6 hex>``: sortable by time, unique per report."""
    now = time.time() if now is None else now
    return f"diag-{datetime.fromtimestamp(now, timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def role_of(component: str) -> str:
    """The platform role of an instance id: ``decode-1`` -> ``decode``, ``redis`` -> ``redis``."""
    return re.sub(r"[-_]?\d+$", "", component) or component


# (role, metric kind) -> what an operator should do first; "*" matches any kind.
ACTIONS: dict[tuple[str, str], str] = {
    ("kvstore", "latency"): "KV store {c} is slow: look at its host (CPU steal, memory, swap) and its log; "
                            "restart it (`cleave down`/`cleave up`, or delete its pod). Workers recompute what "
                            "they cannot fetch, so latency recovers when it answers quickly again.",
    ("kvstore", "errors"): "KV store {c} fails or is down: restart it; with one store every prefix-cache "
                           "hit is lost until it is back. Run a second store (`--kvstores 2`).",
    ("kvstore", "*"): "KV store {c} is short of room or evicting: raise `--kvstore-capacity-mb` or add a store.",
    ("expert", "latency"): "Expert replica {c} is slow: check its host and log, restart it; give its "
                           "expert group a spare replica (`--expert-replicas` above `--expert-groups`).",
    ("expert", "*"): "Expert replica {c} fails or is gone: restart it; run spares (`--expert-replicas` "
                     "above `--expert-groups`) so that one loss does not fail MoE layers.",
    ("decode", "*"): "The decode pool is overloaded ({c} is where it shows): add decode workers "
                     "(`--decode-workers`, or the operator's decode replicas), or lower `--max-num-seqs` "
                     "so that admission rejects early instead of queueing.",
    ("prefill", "*"): "Prefill worker {c} stalls or is overloaded: check its process and log, restart it; "
                      "add prefill workers (`--prefill-workers`) if its queue stays long.",
    ("redis", "*"): "Redis is slow: the registry heartbeats and the KV index wait on it on every request. "
                    "Check `redis-cli --latency` and `SLOWLOG GET`, the host's CPU, and persistence settings.",
    ("router", "*"): "The router is saturated or failing: check its rejections and errors by reason; add a "
                     "router replica or raise the admission limits.",
}
DEFAULT_ACTION = ("Inspect {c}: its log (`cleave status` lists the processes) and the evidence queries "
                  "below in Prometheus.")


def suggested_action(component: str, kind: str) -> str:
    """What to do first about ``component`` when its strongest evidence is of ``kind``."""
    role = role_of(component)
    text = ACTIONS.get((role, kind)) or ACTIONS.get((role, "*")) or DEFAULT_ACTION
    return text.format(c=component)


def summary_line(report: Report) -> str:
    """The one line the dashboard shows (``summary``)."""
    cause = report.get("root_cause")
    if not cause:
        return "no component deviates from its normal behaviour in the window"
    by = "LLM-confirmed" if cause.get("chosen_by") == "llm" else "statistics"
    onset = iso(cause.get("onset")) or "?"
    return f"{cause['component']}: {cause['metric']} deviates from {onset} ({by})"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(report: Report) -> str:
    """The report for people: cause, action, evidence with its PromQL, timeline, rankings."""
    out = [f"# Diagnosis {report['id']}", ""]
    trigger = report.get("trigger") or {}
    window = report.get("window") or {}
    out.append(f"- created: {report.get('created')}; trigger: {trigger.get('kind')}"
               + (f" ({', '.join(trigger['alerts'])})" if trigger.get("alerts") else ""))
    out.append(f"- window: {iso(window.get('start'))} .. {iso(window.get('end'))}, step {_fmt(window.get('step'))} s; "
               f"anomaly at {iso(report.get('anomaly_time'))} "
               f"({'detected' if report.get('anomaly_time_detected') else 'given'})")
    out.append(f"- Prometheus: {report.get('prometheus_url')}")
    out.append("")
    cause = report.get("root_cause")
    out.append("## Root cause")
    out.append("")
    if cause:
        out.append(f"**{cause['component']}** — `{cause['metric']}` (score {_fmt(cause['score'])}, "
                   f"chosen by {cause['chosen_by']})")
        if cause.get("explanation"):
            out += ["", cause["explanation"]]
        out += ["", f"**Suggested action.** {report.get('action')}"]
    else:
        out.append(report.get("summary") or "none")
    llm = report.get("llm") or {}
    out += ["", "## LLM", ""]
    if not llm.get("used"):
        out.append(f"Not used: {llm.get('reason') or 'disabled'}. The statistical ranking stands.")
    elif llm.get("accepted"):
        queries = len(llm.get("queries") or [])
        out.append(f"{llm.get('model')} at {llm.get('url')} chose {llm['verdict']['component']} "
                   f"after {queries} {'query' if queries == 1 else 'queries'} of its own.")
    else:
        out.append(f"{llm.get('model') or 'the LLM'} at {llm.get('url')}: answer rejected ({llm.get('reason')}). "
                   "The statistical ranking stands.")
    out += ["", "## Candidates and evidence", ""]
    if not report.get("candidates"):
        out += ["No component deviates enough from its normal to be a candidate.", ""]
    for cand in report.get("candidates") or []:
        out.append(f"### {cand['rank']}. {cand['component']} (score {_fmt(cand['score'])})")
        out.append("")
        out.append("| series | kind | deviation (scales) | normal | peak | onset |")
        out.append("| --- | --- | ---: | ---: | ---: | --- |")
        for ev in cand["evidence"]:
            out.append(f"| {ev['series']} | {ev['kind']} | {_fmt(ev['deviation'])} | {_fmt(ev['normal'])} | "
                       f"{_fmt(ev['peak'])} | {iso(ev['onset']) or '-'} |")
        out.append("")
        for ev in cand["evidence"]:
            if ev.get("promql"):
                out.append(f"- `{ev['series']}`: `{ev['promql']}`")
        out.append("")
    if report.get("timeline"):
        out += ["## Timeline", ""]
        out += [f"- {iso(e['time'])} {e['component']}: {e['what']}" for e in report["timeline"]]
        out.append("")
    rankers = report.get("rankers") or {}
    if rankers:
        out += ["## Rankings", "", "| rank | " + " | ".join(rankers) + " |", "| ---: |" + " --- |" * len(rankers)]
        depth = max(len(r) for r in rankers.values())
        for i in range(min(depth, 5)):
            cells = [f"{r[i]['component']} ({_fmt(r[i]['score'])})" if i < len(r) else "" for r in rankers.values()]
            out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        out.append("")
    if report.get("errors"):
        out += ["## What could not be read", ""] + [f"- {e}" for e in report["errors"]] + [""]
    return "\n".join(out)
