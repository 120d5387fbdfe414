"""Measurements: params/MACs/latency, bench, reports, figures."""
