"""Routing as a pipeline of small plugins, one pipeline per worker pool.

A request's candidates (the live workers of one role) go through **filters** (drop who
cannot serve it), then **scorers** (each gives every survivor a score in [0, 1],
weighted and summed), then a **picker** (take one). A pipeline is named in config as a
comma list of scorers with optional weights, ``"kv-aware=2,least-loaded"``, or as
``"round-robin"`` (no scorers, the round-robin picker); the filters always run.

Plugins are small classes registered by name in :data:`SCORERS` / :data:`PICKERS`; a
stateful one (the KV-aware scorer's view of what each worker has cached) learns of each
decision through ``observe``."""

from __future__ import annotations

from cleave.router.plugins.base import Candidate, RoutingContext, Pipeline, parse_pipeline
from cleave.router.plugins.pickers import PICKERS
from cleave.router.plugins.scorers import SCORERS

__all__ = ["Candidate", "RoutingContext", "Pipeline", "parse_pipeline", "PICKERS", "SCORERS"]
