"""Decisions without I/O or clock: breaker, budget, backoff, the attempt walk, the command table."""
