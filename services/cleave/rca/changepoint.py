"""Anomaly-time detection when none is given: a multivariate mean-shift (CUSUM) score.

Every series is robust-scaled over the whole table (median, MAD). For each candidate split
``k`` (at least ``min_segment`` rows each side) a series has the two-sample mean-shift
statistic ``s_k = |mean(z[k:]) - mean(z[:k])| * sqrt(k (n-k) / n)``. Each series votes
with its profile ``s_k / max(s)`` weighted by ``clip(max(s) - noise, 0, cap) / cap``, so
that one wild series cannot decide alone and a series whose largest shift is within what
noise gives (``noise``, 3 by default) does not vote; the split with the
largest total is the change point, and the time of its first row is returned. Missing
values are ignored per series.
"""

from __future__ import annotations

import warnings

import numpy as np

from cleave.rca.timeseries import MetricsError, MetricTable


def _robust_scaled(values: np.ndarray) -> np.ndarray:
    median = np.nanmedian(values, axis=0)
    mad = np.nanmedian(np.abs(values - median), axis=0) * 1.4826
    spread = np.nanstd(values, axis=0)
    scale = np.where(mad > 0, mad, np.where(spread > 0, spread, 1.0))
    return (values - median) / scale


def change_scores(table: MetricTable, min_segment: int = 2, cap: float = 10.0,
                  noise: float = 3.0) -> np.ndarray:
    """Score of a change at each row index (0 where no split is allowed)."""
    n = len(table.time)
    scores = np.zeros(n)
    if n < 2 * min_segment:
        return scores
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        z = _robust_scaled(table.values)
        present = ~np.isnan(z)
        z = np.where(present, z, 0.0)
        csum, ccount = np.cumsum(z, axis=0), np.cumsum(present, axis=0)
        total, count = csum[-1], ccount[-1]
        stats = np.zeros((n, z.shape[1]))
        for k in range(min_segment, n - min_segment + 1):
            left_n, right_n = ccount[k - 1], count - ccount[k - 1]
            ok = (left_n > 0) & (right_n > 0)
            left = csum[k - 1] / np.maximum(left_n, 1)
            right = (total - csum[k - 1]) / np.maximum(right_n, 1)
            weight = np.sqrt(left_n * right_n / np.maximum(left_n + right_n, 1))
            stats[k] = np.where(ok, np.abs(right - left) * weight, 0.0)
        peak = stats.max(axis=0)
        votes = np.clip(peak - noise, 0.0, cap) / cap / np.where(peak > 0, peak, 1.0)
        scores = stats @ votes
    return scores


def detect_anomaly_time(table: MetricTable, min_segment: int = 2, cap: float = 10.0,
                        noise: float = 3.0) -> float:
    """Time of the first row after the most likely change point."""
    if len(table.time) < 2 * min_segment:
        raise MetricsError(f"{len(table.time)} rows are too few to find a change point "
                           f"(need {2 * min_segment}); pass the anomaly time")
    return float(table.time[int(np.argmax(change_scores(table, min_segment, cap, noise)))])
