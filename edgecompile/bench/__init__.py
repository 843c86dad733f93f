"""Latency reports: static graph analysis, measured runs, and a device cost model checked against the paper."""
