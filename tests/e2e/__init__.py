"""End-to-end tests: real HTTP servers, real outages, real Prometheus and OTLP receivers."""
