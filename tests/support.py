"""Helpers to run one scenario against a sync or an asyncio client.

Each scenario test takes the ``mode`` fixture ("sync" or "async") and uses a
``Runner``: the same assertions then hold for both drivers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio

from otel_redis_resilience import Event, Resilience


class Recorder:
    """A hook that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


class Runner:
    def __init__(
        self, mode: str, host: str, port: int, *, client_kw: dict[str, Any] | None = None, **res_kw: Any
    ) -> None:
        self.mode = mode
        self.recorder = Recorder()
        res_kw.setdefault("hooks", [self.recorder])
        kw = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, **(client_kw or {})}
        if mode == "sync":
            self.loop = None
            self.client: Any = redis.Redis(host=host, port=port, **kw)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = redis.asyncio.Redis(host=host, port=port, **kw)
        self.res = self._run(self._make(res_kw))

    async def _amake(self, res_kw: dict[str, Any]) -> Resilience:
        return Resilience(self.client, **res_kw)

    def _make(self, res_kw: dict[str, Any]) -> Any:
        if self.loop is None:
            return Resilience(self.client, **res_kw)
        return self._amake(res_kw)

    def _run(self, x: Any) -> Any:
        if self.loop is None:
            return x
        return self.loop.run_until_complete(x)

    def call(self, method: str, *args: Any, deadline: float | None = None, **kw: Any) -> Any:
        """Run one command in its own request scope."""
        if self.loop is None:
            with self.res.request(deadline=deadline) as h:
                return getattr(h, method)(*args, **kw)

        async def go() -> Any:
            async with self.res.request(deadline=deadline) as h:
                return await getattr(h, method)(*args, **kw)

        return self.loop.run_until_complete(go())

    def pipeline(
        self, build: Callable[[Any], None], *, transaction: bool, deadline: float | None = None
    ) -> Any:
        if self.loop is None:
            with self.res.request(deadline=deadline) as h:
                p = h.pipeline(transaction=transaction)
                build(p)
                return p.execute()

        async def go() -> Any:
            async with self.res.request(deadline=deadline) as h:
                p = h.pipeline(transaction=transaction)
                build(p)
                return await p.execute()

        return self.loop.run_until_complete(go())

    def timed(self, method: str, *args: Any, deadline: float | None = None) -> tuple[float, Any]:
        """(seconds, result or exception) of one call."""
        t0 = time.monotonic()
        try:
            out: Any = self.call(method, *args, deadline=deadline)
        except Exception as e:
            out = e
        return time.monotonic() - t0, out

    def timed_kw(
        self, method: str, *args: Any, deadline: float | None = None, **kw: Any
    ) -> tuple[float, Any]:
        """(seconds, result or exception) of one call with keyword arguments."""
        t0 = time.monotonic()
        try:
            out: Any = self.call(method, *args, deadline=deadline, **kw)
        except Exception as e:
            out = e
        return time.monotonic() - t0, out

    def sleep(self, seconds: float) -> None:
        """Let time pass (with the event loop running, so async probes run)."""
        if self.loop is None:
            time.sleep(seconds)
        else:
            self.loop.run_until_complete(asyncio.sleep(seconds))

    def wait_for(self, predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            self.sleep(step)
        return predicate()

    def close(self) -> None:
        self.res.close()
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()
