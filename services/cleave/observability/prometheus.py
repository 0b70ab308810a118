"""Prometheus and Alertmanager for `cleave up`: their configs, written into
``$CLEAVE_HOME/prometheus`` at start, and the processes that run them on loopback.

Prometheus finds every service through the router's ``/admin/prometheus-targets``
(HTTP service discovery over the Redis registry, see ``cleave.router.admin``), so an
instance is scraped from its registration on and dropped when its record expires. If
the router is away, Prometheus keeps the targets it last discovered. Rules are the
repository's ``infra/prometheus/rules/*.yml`` as found at start (``*_test.yml``, promtool's
unit tests, left out; ``POST /-/reload`` re-reads them); alerts go to the local Alertmanager,
whose receiver is the ops agent's webhook (``cleave agent``, ``POST /alerts``), or, with
``--no-agent``, ``null``, which sends nothing anywhere: alerts are then only seen in its UI and API."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml

from cleave.common.config import cleave_home
from cleave.launcher import ProcessSpec, StartupError, client_host, port_in_use

LOOPBACK = "127.0.0.1"
SCRAPE_INTERVAL = "2s"
SD_JOB = "cleave"
RULES_DIR = Path(__file__).resolve().parents[3] / "infra" / "prometheus" / "rules"


def rule_files(rules_dir: Path = RULES_DIR) -> list[str]:
    """The rule files in ``rules_dir``: every ``*.yml`` but promtool's unit tests (``*_test.yml``)."""
    return sorted(str(p) for p in rules_dir.glob("*.yml") if not p.stem.endswith("_test"))


def prometheus_config(sd_url: str | None, static_targets: list[str], prometheus_address: str,
                      alertmanager_address: str, rules: list[str], agent_address: str | None = None) -> dict[str, Any]:
    """Scrape what ``sd_url`` lists (HTTP SD) and ``static_targets`` as job ``cleave``,
    Prometheus and Alertmanager themselves and the ops agent (job ``agent``) if there is one,
    every ``SCRAPE_INTERVAL``."""
    cleave_job: dict[str, Any] = {"job_name": SD_JOB}
    if sd_url is not None:
        cleave_job["http_sd_configs"] = [{"url": sd_url, "refresh_interval": SCRAPE_INTERVAL}]
    if static_targets:
        cleave_job["static_configs"] = [{"targets": static_targets}]
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": rules,
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_address]}]}]},
        "scrape_configs": [
            cleave_job,
            {"job_name": "prometheus", "static_configs": [{"targets": [prometheus_address]}]},
            {"job_name": "alertmanager", "static_configs": [{"targets": [alertmanager_address]}]},
            *([{"job_name": "agent", "static_configs": [{"targets": [agent_address]}]}] if agent_address else []),
        ],
    }


def alertmanager_config(agent_webhook: str | None = None) -> dict[str, Any]:
    """Every alert grouped by name and role into the ops agent's webhook (``cleave-agent``;
    resolved alerts are not sent, the agent only diagnoses firing ones), or without one into
    the ``null`` receiver, which notifies no one."""
    if agent_webhook is None:
        receiver = {"name": "null"}
    else:
        receiver = {"name": "cleave-agent", "webhook_configs": [{"url": agent_webhook, "send_resolved": False}]}
    return {
        "route": {"receiver": receiver["name"], "group_by": ["alertname", "role"], "group_wait": "10s",
                  "group_interval": "1m", "repeat_interval": "4h"},
        "receivers": [receiver],
    }


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `cleave up`; edits are overwritten at the next start.\n"
                    + yaml.safe_dump(document, sort_keys=False))
    return path


def binary(*names: str) -> str:
    for name in names:
        if found := shutil.which(name):
            return found
    raise StartupError(f"{names[0]} is not installed; run: make install (infra/scripts/prometheus.sh install), "
                       "or pass --no-prometheus")


def prometheus_tiers(args: argparse.Namespace) -> list[list[ProcessSpec]]:
    """One final tier, Prometheus and Alertmanager on loopback, configs written; none
    with ``--no-prometheus``. The router must already serve its targets (the disaggregated
    platform); ``cleave serve`` (``--mode single``) is scraped as a static target."""
    if args.no_prometheus:
        return []
    for flag, port in (("--prometheus-port", args.prometheus_port), ("--alertmanager-port", args.alertmanager_port)):
        if port_in_use(LOOPBACK, port):
            raise StartupError(f"port already in use: {flag} {port}; stop what holds it, pick another "
                               "or pass --no-prometheus")
    home = cleave_home() / "prometheus"
    prometheus_address, alertmanager_address = f"{LOOPBACK}:{args.prometheus_port}", f"{LOOPBACK}:{args.alertmanager_port}"
    router = f"{client_host(args.host)}:{args.port}"
    single = args.mode == "single"
    sd_url = None if single else f"http://{router}/admin/prometheus-targets"
    # Namespaces built by hand (tests) may not know the agent's flags: no agent then.
    agent = None if getattr(args, "no_agent", True) else f"{LOOPBACK}:{args.agent_port}"
    prometheus_yml = write_yaml(home / "prometheus.yml", prometheus_config(
        sd_url, [router] if single else [], prometheus_address, alertmanager_address, rule_files(), agent))
    alertmanager_yml = write_yaml(home / "alertmanager.yml",
                                  alertmanager_config(f"http://{agent}/alerts" if agent else None))
    prometheus = ProcessSpec(
        "prometheus",
        [binary("prometheus"), f"--config.file={prometheus_yml}", f"--storage.tsdb.path={home / 'data'}",
         f"--web.listen-address={prometheus_address}", "--web.enable-lifecycle", "--storage.tsdb.retention.time=2d"],
        health_url=f"http://{prometheus_address}/-/ready",
        info={"url": f"http://{prometheus_address}", "config": str(prometheus_yml)},
    )
    alertmanager = ProcessSpec(
        "alertmanager",
        [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={alertmanager_yml}",
         f"--storage.path={home / 'alertmanager'}", f"--web.listen-address={alertmanager_address}",
         "--cluster.listen-address="],
        health_url=f"http://{alertmanager_address}/-/ready",
        info={"url": f"http://{alertmanager_address}", "config": str(alertmanager_yml)},
    )
    return [[prometheus, alertmanager]]
