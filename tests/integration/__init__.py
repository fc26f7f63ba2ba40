"""Tests against real redis-server processes (and the fault proxy), in-process."""
