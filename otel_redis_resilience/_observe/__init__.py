"""Telemetry: the one place spans, events, metrics, logs and hook events leave from."""
