"""Tests of the test infrastructure itself: if these fail, nothing else can be trusted.

Every fault is checked against a real redis-server, from the point of view of a plain
redis-py client with small timeouts and redis-py's own retries disabled, so what we see
is exactly what the proxy / server did.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from testbed import FaultProxy, RedisServer, RedisServerError, pdeathsig_prefix, redis_server_binary
from testbed import redis_server as redis_server_module

TIMEOUT = 0.3


class MakeClient(Protocol):
    def __call__(self, port: int, timeout: float = ...) -> redis.Redis[bytes]: ...


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Factory for redis-py clients with a 0.3 s timeout and no redis-py retries."""
    clients: list[redis.Redis[bytes]] = []

    def make(port: int, timeout: float = TIMEOUT) -> redis.Redis[bytes]:
        c = redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def _raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; treat it as dead only if /proc says so.
    return redis_server_module._proc_state(pid) not in (None, "Z")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# --- RedisServer -----------------------------------------------------------------------


def test_redis_server_binary_is_found() -> None:
    assert os.access(redis_server_binary(), os.X_OK)


def test_server_lifecycle_and_idempotent_stop() -> None:
    server = RedisServer()
    assert not server.running
    server.start()
    pid = server.pid
    assert pid is not None
    assert server.running
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.client().ping()
    # No persistence: a test server must never write dump.rdb / appendonly files.
    cfg = server.client().config_get("save")
    assert cfg["save"] == ""
    assert server.client().config_get("appendonly")["appendonly"] == "no"

    server.stop()
    assert not server.running
    assert server.pid is None
    assert not _pid_alive(pid)
    assert _port_is_free(server.port)
    server.stop()  # idempotent


def test_context_manager_and_extra_args() -> None:
    with RedisServer(extra_args=["--maxmemory", "12345678"]) as server:
        pid = server.pid
        assert pid is not None
        assert server.client().config_get("maxmemory")["maxmemory"] == "12345678"
    assert not _pid_alive(pid)


def test_kill_then_restart_on_same_port(redis_server: RedisServer, make_client: MakeClient) -> None:
    port, old_pid = redis_server.port, redis_server.pid
    redis_server.client().set("k", "v")

    redis_server.kill()
    assert not redis_server.running
    assert redis_server.pid is None
    with pytest.raises(redis.ConnectionError):
        make_client(port).ping()

    started = time.monotonic()
    redis_server.restart()
    assert time.monotonic() - started < 1.0
    assert redis_server.port == port
    assert redis_server.pid not in (None, old_pid)
    assert make_client(port).ping()
    assert redis_server.client().get("k") is None  # nothing persisted


def test_restart_while_running(redis_server: RedisServer) -> None:
    old_pid = redis_server.pid
    redis_server.restart()
    assert redis_server.running
    assert redis_server.pid != old_pid
    assert redis_server.client().ping()


def test_pause_and_resume(redis_server: RedisServer, make_client: MakeClient) -> None:
    c = make_client(redis_server.port)
    assert c.ping()

    redis_server.pause()
    assert redis_server.paused
    assert redis_server.running
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        c.get("k")
    assert time.monotonic() - started < 1.0

    redis_server.resume()
    assert not redis_server.paused
    assert c.ping()


def test_stop_paused_server_is_quick() -> None:
    server = RedisServer().start()
    pid = server.pid
    assert pid is not None
    server.pause()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    assert not _pid_alive(pid)


def test_command_count(redis_server: RedisServer) -> None:
    c = redis_server.client()
    assert redis_server.command_count("incr") == 0
    for _ in range(3):
        c.execute_command("INCR", "n")
    assert redis_server.command_count("incr") == 3
    assert redis_server.command_count("INCR") == 3
    assert redis_server.command_count("get") == 0
    # Counts what the server executed, not what redis-py's method is called:
    # redis-py's incr() sends INCRBY.
    c.incr("n")
    assert redis_server.command_count("incrby") == 1
    assert redis_server.command_count("incr") == 3


def test_start_failure_has_clear_error() -> None:
    server = RedisServer(extra_args=["--no-such-option", "x"])
    with pytest.raises(RedisServerError, match=r"(?s)exited with code .*no-such-option"):
        server.start()
    assert not server.running
    server.stop()


def test_fixed_port_in_use_fails_after_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server_module, "_BIND_RETRY_WINDOW", 0.2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = RedisServer(port=port)
        with pytest.raises(RedisServerError, match="address in use"):
            server.start()
        server.stop()


def _poll_ready(server: RedisServer, timeout: float = 10.0) -> float:
    """Poll ``server.ready()`` until True; the seconds it took."""
    started = time.monotonic()
    while not server.ready():
        assert time.monotonic() - started < timeout, f"not ready in {timeout} s: {server.log_tail()}"
        time.sleep(0.005)
    return time.monotonic() - started


def test_start_without_waiting_then_ready_and_again_after_kill(make_client: MakeClient) -> None:
    server = RedisServer()
    with pytest.raises(RedisServerError, match="not started"):
        server.ready()
    try:
        server.start(wait=False)
        assert server.running
        _poll_ready(server)
        port = server.port
        assert make_client(port).ping()
        assert server.log_path is not None
        assert "Ready to accept connections" in server.log_path.read_text()

        # The demo's outage: SIGKILL, then back on the same port without blocking.
        old_pid = server.pid
        server.kill()
        assert server.log_path is not None  # kept across a kill
        server.start(wait=False)
        assert server.pid not in (None, old_pid)
        _poll_ready(server)
        assert server.port == port
        assert make_client(port).ping()

        server.restart(wait=False)
        _poll_ready(server)
        assert server.port == port
    finally:
        server.stop()
    assert not server.running
    assert server.log_path is None


def test_ready_raises_when_the_server_died_starting() -> None:
    server = RedisServer(extra_args=["--no-such-option", "x"])
    try:
        server.start(wait=False)
        with pytest.raises(RedisServerError, match=r"(?s)exited with code .*no-such-option"):
            _poll_ready(server)
        assert not server.running
    finally:
        server.stop()


def test_ready_raises_when_the_port_is_taken() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = RedisServer(port=squatter.getsockname()[1])
        try:
            server.start(wait=False)  # no retry without waiting: ready() tells
            with pytest.raises(RedisServerError, match=r"(?s)exited.*Address already in use"):
                _poll_ready(server)
        finally:
            server.stop()


def test_pdeathsig_prefix_main_thread_only() -> None:
    prefix = pdeathsig_prefix("TERM")
    if shutil.which("setpriv") is None:
        assert prefix == []
    else:
        assert prefix[1:] == ["--pdeathsig", "TERM", "--"]
    # PDEATHSIG follows the forking thread: from any other thread, no prefix.
    seen: list[list[str]] = []
    t = threading.Thread(target=lambda: seen.append(pdeathsig_prefix()))
    t.start()
    t.join()
    assert seen == [[]]


# The child prints once it runs: setpriv has set the parent-death signal and exec'd it by then
# (a parent killed before that is a race setpriv does not cover).
_ORPHAN = "import time; print('up', flush=True); time.sleep(60)"
_ORPHAN_MAKER = f"""
import subprocess, sys, time
from testbed import pdeathsig_prefix
print(subprocess.Popen([*pdeathsig_prefix("KILL"), sys.executable, "-c", {_ORPHAN!r}]).pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_pdeathsig_prefix_child_dies_with_its_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_MAKER], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert parent.stdout.readline() == "up\n"
        assert _pid_alive(child)
        parent.kill()  # no atexit, no cleanup: only the kernel can stop the child now
        parent.wait(5)
        deadline = time.monotonic() + 5
        while _pid_alive(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait(5)
        if child is not None and _pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_clean_redis_is_empty_with_fresh_stats(clean_redis: RedisServer) -> None:
    c = clean_redis.client()
    assert c.dbsize() == 0
    assert clean_redis.command_count("flushall") == 0
    c.set("left-behind", "1")  # the next user of clean_redis must not see this


def test_clean_redis_again_is_empty(clean_redis: RedisServer) -> None:
    assert clean_redis.client().dbsize() == 0


# --- FaultProxy ------------------------------------------------------------------------


def test_pass(proxy: FaultProxy, redis_server: RedisServer, make_client: MakeClient) -> None:
    c = make_client(proxy.port)
    assert c.set("k", "v")
    assert c.get("k") == b"v"
    assert proxy.connections_accepted == 1
    assert redis_server.command_count("set") == 1
    # A big value spans many chunks in both directions.
    big = os.urandom(3 * 1024 * 1024)
    c.set("big", big)
    assert c.get("big") == big


def test_latency_adds_delay_in_each_direction(proxy: FaultProxy, make_client: MakeClient) -> None:
    c = make_client(proxy.port, timeout=1.0)
    c.ping()

    proxy.set_mode("latency", latency=0.05)
    started = time.monotonic()
    assert c.ping()
    elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 0.5  # 0.05 s each way

    proxy.set_mode("pass")
    started = time.monotonic()
    c.ping()
    assert time.monotonic() - started < 0.1


def test_latency_with_jitter_preserves_order(proxy: FaultProxy, make_client: MakeClient) -> None:
    c = make_client(proxy.port, timeout=2.0)
    proxy.set_mode("latency", latency=0.001, jitter=0.01)
    assert [c.incr("n") for _ in range(10)] == list(range(1, 11))
    # A large pipeline goes out and comes back in many chunks, each with its own jitter.
    pipe = c.pipeline(transaction=False)
    for _ in range(5000):
        pipe.incr("n")
    assert pipe.execute() == list(range(11, 5011))


def test_blackhole_hangs_existing_and_new_connections(
    proxy: FaultProxy, redis_server: RedisServer, make_client: MakeClient
) -> None:
    existing = make_client(proxy.port)
    assert existing.ping()
    raw = _raw_connect(proxy.port)

    proxy.set_mode("blackhole")
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        existing.get("k")
    assert time.monotonic() - started < 1.0
    # New connections are accepted (no ConnectionError), then nothing is answered.
    with pytest.raises(redis.TimeoutError):
        make_client(proxy.port).get("k")
    # Requests were swallowed, not forwarded.
    assert redis_server.command_count("get") == 0
    raw.sendall(b"PING\r\n")
    with pytest.raises(socket.timeout):
        raw.recv(64)  # and the connection is not closed either

    # Leaving blackhole resets blackholed connections...
    proxy.set_mode("pass")
    with pytest.raises(ConnectionResetError):
        raw.recv(64)
    raw.close()
    # ...and normal service resumes.
    assert existing.ping()
    assert make_client(proxy.port).get("k") is None


def test_reset_resets_existing_and_new_connections(proxy: FaultProxy, make_client: MakeClient) -> None:
    existing = make_client(proxy.port)
    assert existing.ping()
    raw = _raw_connect(proxy.port)

    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        raw.recv(64)
    raw.close()
    with pytest.raises(redis.ConnectionError):
        existing.ping()
    with pytest.raises(redis.ConnectionError):
        make_client(proxy.port).ping()
    assert proxy.connections_accepted >= 4

    proxy.set_mode("pass")
    assert existing.ping()


def test_refuse_closes_listener_then_reopens_same_port(proxy: FaultProxy, make_client: MakeClient) -> None:
    port = proxy.port
    existing = make_client(port)
    assert existing.ping()

    proxy.set_mode("refuse")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    with pytest.raises(redis.ConnectionError, match=r"(?i)refused"):
        make_client(port).ping()
    # The existing connection was reset; redis-py's reconnect is then refused.
    with pytest.raises(redis.ConnectionError):
        existing.ping()

    proxy.set_mode("pass")
    assert proxy.port == port
    assert existing.ping()
    assert make_client(port).ping()


def test_drop_replies_count_one(
    proxy: FaultProxy, redis_server: RedisServer, make_client: MakeClient
) -> None:
    c = make_client(proxy.port)
    assert c.ping()

    proxy.set_mode("drop_replies", count=1)
    with pytest.raises(redis.TimeoutError):
        c.incr("n")
    # The command ran; only its reply was lost.
    assert redis_server.client().get("n") == b"1"
    assert proxy.replies_dropped == 1
    # Nothing left to drop: the next command works (redis-py reconnects after a timeout).
    assert c.incr("n") == 2
    assert proxy.replies_dropped == 1


def test_drop_replies_unlimited(
    proxy: FaultProxy, redis_server: RedisServer, make_client: MakeClient
) -> None:
    c = make_client(proxy.port)
    assert c.ping()
    proxy.set_mode("drop_replies")
    with pytest.raises(redis.TimeoutError):
        c.incr("n")
    assert redis_server.client().get("n") == b"1"
    # redis-py dropped the timed-out connection; the new one's handshake reply is
    # dropped too, so it fails before INCR is even sent.
    with pytest.raises(redis.TimeoutError):
        c.incr("n")
    assert redis_server.client().get("n") == b"1"
    assert proxy.replies_dropped >= 2

    proxy.set_mode("pass")
    assert c.incr("n") == 2


def test_upstream_death_is_passed_on(
    proxy: FaultProxy, redis_server: RedisServer, make_client: MakeClient
) -> None:
    c = make_client(proxy.port)
    assert c.ping()
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        c.ping()  # existing connection closed, reconnect accepted then reset
    redis_server.restart()
    assert c.ping()


def test_set_mode_validation(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown proxy mode"):
        proxy.set_mode("explode")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="does not take"):
        proxy.set_mode("pass", latency=1)
    with pytest.raises(TypeError, match="requires latency"):
        proxy.set_mode("latency")
    assert proxy.mode == "pass"


def test_stop_with_hung_connections_is_quick(redis_server: RedisServer, make_client: MakeClient) -> None:
    proxy = FaultProxy(redis_server.host, redis_server.port).start()
    port = proxy.port
    raws = [_raw_connect(port) for _ in range(3)]
    proxy.set_mode("blackhole")
    for s in raws:
        s.sendall(b"PING\r\n")
    proxy_threads = [t for t in threading.enumerate() if t.name == f"FaultProxy-{port}"]
    assert len(proxy_threads) == 1

    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 0.5
    assert not proxy_threads[0].is_alive()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    for s in raws:
        s.close()
    proxy.stop()  # idempotent
