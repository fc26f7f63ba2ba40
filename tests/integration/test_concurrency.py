"""Many threads/tasks with random short deadlines against a slow Redis: no reply is ever misrouted.

A command abandoned at its deadline must never leave its connection in the pool
with a reply in flight (the bug class of CVE-2023-28858/28859).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import BreakerPolicy, RedisUnavailable, Resilience, RetryPolicy
from testbed import FaultProxy, RedisServer

KEYS = 64
# The breaker must stay out of the way: this test is about deadlines and connections.
NO_BREAKER = BreakerPolicy(failure_threshold=1_000_000, minimum_calls=1_000_000)


def _seed(server: RedisServer) -> None:
    direct = server.client()
    direct.mset({f"key:{i}": f"value:{i}" for i in range(KEYS)})


@pytest.mark.slow
def test_threads_never_read_another_commands_reply(redis_server: RedisServer, proxy: FaultProxy) -> None:
    _seed(redis_server)
    client = redis.Redis(host=proxy.host, port=proxy.port, max_connections=64)
    res = Resilience(client, retry=RetryPolicy(attempt_timeout=None, max_attempts=2), breaker=NO_BREAKER)
    proxy.set_mode("latency", latency=0.001, jitter=0.004)
    stop = time.monotonic() + 4.0
    ok, timeouts, wrong = [0], [0], []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            i = rnd.randrange(KEYS)
            try:
                with res.request(deadline=rnd.uniform(0.002, 0.05)) as h:
                    got = h.get(f"key:{i}")
            except RedisUnavailable:
                with lock:
                    timeouts[0] += 1
                continue
            with lock:
                ok[0] += 1
                if got != f"value:{i}".encode():
                    wrong.append((i, got))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not wrong, wrong[:5]
    # Both paths were exercised: replies read in time, and attempts abandoned mid-flight.
    assert ok[0] > 100, (ok, timeouts)
    assert timeouts[0] > 100, (ok, timeouts)


@pytest.mark.slow
async def test_tasks_never_read_another_commands_reply(redis_server: RedisServer, proxy: FaultProxy) -> None:
    _seed(redis_server)
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, max_connections=200)
    res = Resilience(client, retry=RetryPolicy(attempt_timeout=None, max_attempts=2), breaker=NO_BREAKER)
    proxy.set_mode("latency", latency=0.001, jitter=0.004)
    stop = time.monotonic() + 4.0
    ok, timeouts, wrong = 0, 0, []

    async def worker(seed: int) -> None:
        nonlocal ok, timeouts
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            i = rnd.randrange(KEYS)
            try:
                async with res.request(deadline=rnd.uniform(0.002, 0.1)) as h:
                    if rnd.random() < 0.2:
                        p = h.pipeline(transaction=False)
                        p.get(f"key:{i}")
                        p.get(f"key:{(i + 1) % KEYS}")
                        got_pair = await p.execute()
                        if got_pair != [f"value:{i}".encode(), f"value:{(i + 1) % KEYS}".encode()]:
                            wrong.append((i, got_pair))
                        ok += 1
                        continue
                    got = await h.get(f"key:{i}")
            except RedisUnavailable:
                timeouts += 1
                continue
            ok += 1
            if got != f"value:{i}".encode():
                wrong.append((i, got))

    await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(20))), 60)
    assert not wrong, wrong[:5]
    assert ok > 100, (ok, timeouts)
    assert timeouts > 100, (ok, timeouts)
    await client.aclose()
