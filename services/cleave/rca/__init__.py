"""Root-cause analysis over metric time series: load, find the anomaly time, rank components."""
