"""Observability of the local platform: Prometheus and Alertmanager as `cleave up` runs them."""
