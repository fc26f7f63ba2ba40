"""Shared fixtures: real redis-server processes and a fault-injecting proxy.

- ``redis_server``: a fresh server per test -- use it when the test kills, pauses,
  restarts or reconfigures the server.
- ``proxy``: a :class:`~testbed.FaultProxy` in front of ``redis_server`` (mode
  ``"pass"``); point the client under test at ``proxy.host`` / ``proxy.port``.
- ``clean_redis``: the session-wide healthy server, emptied for this test.  Tests using
  it must not kill, pause or reconfigure it (use ``redis_server`` for that).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from testbed import FaultProxy, RedisServer, RedisServerError, redis_server_binary

pytest_plugins = ["tests.canary"]


def pytest_configure(config: pytest.Config) -> None:
    # Fail fast, once, with the install hint, instead of erroring in every test that
    # needs a server.  Nothing else belongs here: markers and options live in pyproject.
    try:
        redis_server_binary()
    except RedisServerError as e:
        raise pytest.UsageError(str(e)) from e


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for this test, stopped (and never leaked) afterwards."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    """A FaultProxy in "pass" mode in front of this test's ``redis_server``."""
    with FaultProxy(redis_server.host, redis_server.port) as p:
        yield p


@pytest.fixture(scope="session")
def shared_redis_server() -> Iterator[RedisServer]:
    """One healthy redis-server for the whole session; prefer ``clean_redis``."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def clean_redis(shared_redis_server: RedisServer) -> RedisServer:
    """The shared server after FLUSHALL, SCRIPT FLUSH and CONFIG RESETSTAT.

    RESETSTAT comes last so :meth:`RedisServer.command_count` starts from zero for
    every test.  If an earlier test broke the rule and killed or paused the shared
    server, it is brought back rather than failing every later test.
    """
    server = shared_redis_server
    if server.paused:
        server.resume()
    if not server.running:
        server.restart()
    # A private client rather than server.client(): those are kept until stop(), and the
    # session server lives for the whole run.
    with redis.Redis(host=server.host, port=server.port, socket_timeout=5.0) as c:
        c.flushall()
        c.script_flush()
        c.config_resetstat()
    return server
