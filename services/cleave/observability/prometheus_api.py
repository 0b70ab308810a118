"""A small client of the Prometheus HTTP API (``/api/v1``): instant and range queries,
label values and the scrape targets. Every failure, an unreachable server, a timeout, an
HTTP error or a query Prometheus rejects, is raised as :class:`PrometheusUnavailable`
with the reason, so callers handle one exception type."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class PrometheusUnavailable(RuntimeError):
    """Prometheus cannot answer: unreachable, timed out, an HTTP error or an error answer
    (a bad query). The message says which, with Prometheus' own error where it gave one."""


class PrometheusAPI:
    """Queries against the Prometheus server at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, params: dict[str, Any] | list[tuple[str, Any]] | None = None) -> Any:
        """``data`` of a successful answer of ``GET /api/v1/<path>``."""
        address = f"{self.url}/api/v1/{path}"
        if params:
            address += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(address, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            # Prometheus answers 400/422/503 with a JSON error body that names the problem.
            try:
                body = json.load(error)
            except ValueError:
                raise PrometheusUnavailable(f"Prometheus at {self.url} answered HTTP {error.code} to {path}") from None
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            raise PrometheusUnavailable(f"Prometheus at {self.url} cannot be read ({path}): {reason}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            body = body if isinstance(body, dict) else {}
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered {body.get('errorType', 'an error')} to {path}: {body.get('error')}")
        return body.get("data")

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """Instant query: ``[{"metric": {labels}, "value": [t, "v"]}, ...]``; a scalar
        answer comes back as one series with no labels."""
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self.get("query", params) or {}
        if data.get("resultType") == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data.get("result") or ())

    def query_value(self, expr: str, time: float | None = None) -> float | None:
        """The instant query's value summed over its series; None for an empty vector or NaN."""
        values = [float(series["value"][1]) for series in self.query(expr, time)]
        values = [value for value in values if not math.isnan(value)]
        return sum(values) if values else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query: ``[{"metric": {labels}, "values": [[t, "v"], ...]}, ...]``."""
        data = self.get("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                        "step": f"{step:g}"}) or {}
        return list(data.get("result") or ())

    def label_values(self, label: str, match: str | None = None,
                     start: float | None = None, end: float | None = None) -> list[str]:
        """Values of ``label``, optionally only on series matching the selector ``match``."""
        params: list[tuple[str, Any]] = []
        if match:
            params.append(("match[]", match))
        if start is not None:
            params.append(("start", f"{start:.3f}"))
        if end is not None:
            params.append(("end", f"{end:.3f}"))
        return list(self.get(f"label/{urllib.parse.quote(label, safe='')}/values", params) or ())

    def metric_names(self, match: str | None = None) -> list[str]:
        """Every metric name Prometheus holds (``__name__`` values)."""
        return self.label_values("__name__", match)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, each with ``labels``, ``health`` and ``lastError``."""
        return list((self.get("targets", {"state": "active"}) or {}).get("activeTargets") or ())
