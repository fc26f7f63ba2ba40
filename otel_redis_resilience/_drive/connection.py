"""Hooks into redis-py connections: deadline-capped sockets and "was it sent?" tracking.

``Resilience`` swaps the client's connection class for a subclass built here
(the user's class keeps its behaviour; ours only wraps the socket). The hooks
read the attempt in flight from a context variable, so connections used outside
a resilient handle behave exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from typing import Any

from .context import CURRENT_ATTEMPT

_monotonic = time.monotonic
# How far past the deadline a socket timeout may fire: the price of skipping a
# settimeout() system call on almost every socket operation.
_SLACK = 0.002


class DeadlineSocket:
    """A socket whose blocking calls never outlive the current attempt's deadline.

    A per-read socket timeout alone is not enough: connecting sends several
    commands (HELLO, CLIENT SETINFO...) and each read would get the full
    timeout. Capping every call by the time left makes the attempt's total
    bounded, whatever redis-py does inside.
    """

    __slots__ = ("_applied", "_poll", "_sock", "_timeout", "quiet")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._poll: Any = None
        self._timeout = sock.gettimeout()
        self._applied = self._timeout
        #: True while the connection handshake runs: its bytes are not the command's.
        self.quiet = False

    def _cap(self) -> Any:
        attempt = CURRENT_ATTEMPT.get()
        if attempt is None or attempt.deadline is None:
            if self._applied != self._timeout:
                self._sock.settimeout(self._timeout)
                self._applied = self._timeout
            return attempt
        wanted = attempt.deadline - _monotonic()
        if wanted <= 0:
            raise TimeoutError("attempt deadline reached")
        if self._timeout == 0:
            # redis-py's non-blocking peek stays non-blocking. Any other socket_timeout
            # is replaced by the attempt's own bound, as on asyncio connections (the
            # owner made it the attempt's bound when attempt_timeout is None).
            wanted = 0
        applied = self._applied
        # settimeout() is a system call: skip it while the timeout in force is
        # close enough, at most _SLACK past the deadline and at most 10% short of it.
        if applied is None or applied > wanted + _SLACK or applied < wanted * 0.9:
            self._sock.settimeout(wanted)
            self._applied = wanted
        return attempt

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._applied != 0:  # 0: redis-py's non-blocking peek, nothing to cap
            self._cap()
        return self._sock.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._applied != 0:
            self._cap()
        return self._sock.recv_into(buffer, nbytes, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        attempt = self._cap()
        if attempt is not None and not self.quiet:
            # Set before writing: once any byte may have left, the command may run.
            attempt.sent = True
        self._sock.sendall(data, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        attempt = self._cap()
        if attempt is not None and not self.quiet:
            attempt.sent = True
        return self._sock.send(data, flags)

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        if value != 0:
            # redis-py restores its socket timeout around every pooled checkout; inside
            # an attempt, apply the attempt's remaining time right away, so the next
            # socket call does not need a second system call to set it.
            attempt = CURRENT_ATTEMPT.get()
            if attempt is not None and attempt.deadline is not None:
                value = max(attempt.deadline - _monotonic(), 0.0001)
        self._applied = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def quiet_now(self) -> bool:
        """True if nothing at all can be read now (no data, no EOF, no error): one poll(2)."""
        poller = self._poll
        if poller is None:
            poller = self._poll = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN | select.POLLPRI)
        return not poller.poll(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SyncConnectionHooks:
    """Mixed in front of a sync redis-py connection class."""

    _sock: Any
    _parser: Any
    socket_connect_timeout: float | None

    def can_read(self, timeout: float = 0) -> bool:
        # The pool asks this on every checkout; redis-py answers with a
        # non-blocking peek (two settimeout calls and a recv). One poll(2) says
        # the same when the socket is quiet, which is nearly always; anything
        # else goes to redis-py's own check.
        sock = self._sock
        if timeout == 0 and isinstance(sock, DeadlineSocket):
            buffer = getattr(self._parser, "_buffer", None)
            unread = getattr(buffer, "unread_bytes", None)
            if unread is not None and not unread() and sock.quiet_now():
                return False
        return super().can_read(timeout)  # type: ignore[misc,no-any-return]

    def _connect(self) -> Any:
        attempt = CURRENT_ATTEMPT.get()
        saved = self.socket_connect_timeout
        if attempt is not None and attempt.deadline is not None:
            remaining = max(attempt.deadline - _monotonic(), 0.0001)
            if saved is None or remaining < saved:
                self.socket_connect_timeout = remaining
        try:
            sock = super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout = saved
        return DeadlineSocket(sock)

    def on_connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        sock = self._sock
        if isinstance(sock, DeadlineSocket):
            sock.quiet = True
        try:
            return super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]
        finally:
            if isinstance(sock, DeadlineSocket):
                sock.quiet = False


class SyncHealthCheckHooks(SyncConnectionHooks):
    """Also keeps redis-py's health-check PING (``health_check_interval``) from marking a command sent."""

    def check_health(self) -> Any:
        # The health-check PING is not the command: it must not mark it as sent.
        sock = self._sock
        if isinstance(sock, DeadlineSocket):
            sock.quiet = True
        try:
            return super().check_health()  # type: ignore[misc]
        finally:
            if isinstance(sock, DeadlineSocket):
                sock.quiet = False


class TrackingWriter:
    """Wraps an asyncio StreamWriter to note when the command's bytes are written."""

    __slots__ = ("_writer", "quiet", "transport")

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.quiet = False
        # A slot, not __getattr__: the pool checkout asks it on every command.
        self.transport = writer.transport

    def _mark(self) -> None:
        if not self.quiet:
            attempt = CURRENT_ATTEMPT.get()
            if attempt is not None:
                attempt.sent = True

    def write(self, data: Any) -> None:
        self._mark()
        self._writer.write(data)

    def writelines(self, data: Any) -> None:
        self._mark()
        self._writer.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def _dead(reader: Any, writer: Any) -> bool:
    """True if the server already closed or reset this connection, as far as the event loop has seen.

    Attribute reads only, no system call: a closed connection is noticed by the
    event loop while it sits idle in the pool (EOF for a FIN, a closing transport
    for a reset).
    """
    if reader.at_eof():
        return True
    transport = writer.transport
    return transport is not None and bool(transport.is_closing())


class AsyncConnectionHooks:
    """Mixed in front of an asyncio redis-py connection class."""

    _reader: Any
    _writer: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Connections are often made inside an attempt (the pool creates them on
        # checkout), where ``socket_timeout`` reads None. redis-py copies it at
        # construction (``orig_socket_timeout``, restored after a maintenance
        # event), and that copy must be the client's own value.
        token = CURRENT_ATTEMPT.set(None)
        try:
            super().__init__(*args, **kwargs)
        finally:
            CURRENT_ATTEMPT.reset(token)

    async def can_read(self) -> bool:
        # The pool asks this on every checkout, before the command is written. redis-py
        # 8.1's asyncio pool ignores the answer while maintenance notifications are on
        # (the default), so an idle connection the server closed during an outage would
        # carry the command and fail: a failed attempt counted against a healthy Redis,
        # and for a command that never ran. Inside an attempt, replace such a connection
        # first; the reconnect is part of the attempt, so its deadline bounds it (the
        # watchdog cancels it) and the handshake does not mark the command sent.
        # Outside an attempt, redis-py's behaviour is left as it is.
        #
        # A connection opened on another event loop (an app whose lifespan ran twice,
        # as two `with TestClient(app):` sessions do) cannot be used from this one, nor
        # closed through its transport: abandon it and connect afresh, the same way.
        reader = self._reader
        if reader is not None and CURRENT_ATTEMPT.get() is not None:
            if self._orr_loop is not asyncio.get_running_loop():
                self._abandon()
                await self.connect()  # type: ignore[attr-defined]
            elif _dead(reader, self._writer):
                await self.disconnect(nowait=True)  # type: ignore[attr-defined]
                await self.connect()  # type: ignore[attr-defined]
        return await super().can_read()  # type: ignore[misc,no-any-return]

    _orr_loop: asyncio.AbstractEventLoop | None = None

    def _abandon(self) -> None:
        writer = self._writer
        with contextlib.suppress(RuntimeError):  # "Event loop is closed"
            writer.close()
        self._writer = self._reader = None
        self._parser.on_disconnect()  # type: ignore[attr-defined]

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[misc]
        self._orr_loop = asyncio.get_running_loop()
        if self._writer is not None and not isinstance(self._writer, TrackingWriter):
            self._writer = TrackingWriter(self._writer)

    async def on_connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        writer = self._writer
        if isinstance(writer, TrackingWriter):
            writer.quiet = True
        try:
            return await super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            # redis-py cleans up after a RedisError here but not after a
            # cancellation: a handshake cut short would leave its reply in
            # flight on a pooled connection, to be read by the next command.
            self._close()  # type: ignore[attr-defined]
            raise
        finally:
            if isinstance(writer, TrackingWriter):
                writer.quiet = False


class AsyncHealthCheckHooks(AsyncConnectionHooks):
    """Also keeps redis-py's health-check PING from marking a command sent."""

    async def check_health(self) -> Any:
        writer = self._writer
        if isinstance(writer, TrackingWriter):
            writer.quiet = True
        try:
            return await super().check_health()  # type: ignore[misc]
        finally:
            if isinstance(writer, TrackingWriter):
                writer.quiet = False


_sync_classes: dict[tuple[type, type], type] = {}
_async_classes: dict[tuple[type, type], type] = {}


def hooked_class(cls: type, *, is_async: bool, health_checks: bool) -> type:
    """The hooked subclass of a redis-py connection class (cached)."""
    if is_async:
        hooks: type = AsyncHealthCheckHooks if health_checks else AsyncConnectionHooks
        base_hooks: type = AsyncConnectionHooks
    else:
        hooks = SyncHealthCheckHooks if health_checks else SyncConnectionHooks
        base_hooks = SyncConnectionHooks
    if issubclass(cls, base_hooks):
        return cls
    cache = _async_classes if is_async else _sync_classes
    found = cache.get((cls, hooks))
    if found is None:
        namespace: dict[str, Any] = {"__module__": __name__}
        if is_async:
            namespace["socket_timeout"] = _attempt_socket_timeout(cls)
        found = type(f"Resilient{cls.__name__}", (hooks, cls), namespace)
        cache[(cls, hooks)] = found
    return found


def _attempt_socket_timeout(cls: type) -> property:
    """An asyncio connection's ``socket_timeout``: the client's own, but None inside our attempts.

    redis-py's asyncio reads and writes take their timeout from this attribute.
    Inside an attempt the library bounds the whole attempt by cancelling it at
    its deadline (the watchdog in ``aio.py``), so redis-py's own timeouts must stay
    out of the way there: its writes would go through ``asyncio.wait_for``
    (an extra task per command, and on 3.11 it can swallow the cancellation,
    CPython gh-86296), and a shorter per-read timeout would cut the attempt
    short. Everywhere else (the client called directly, the probe, the replayer)
    the connection keeps the client's ``socket_timeout``: wrapping a client must
    not change how it behaves outside a handle. One context-variable read per
    access, no system call.
    """
    stored: Any = None
    for klass in cls.__mro__:
        if "socket_timeout" in vars(klass):
            stored = vars(klass)["socket_timeout"]
            break
    if stored is not None and hasattr(stored, "__get__") and hasattr(stored, "__set__"):
        # redis-py keeps it in a __slots__ slot: the value stays there, so a connection
        # whose class is swapped in place (a single-connection client) keeps its own.
        slot_get = stored.__get__
        slot_set = stored.__set__

        def get_value(conn: Any) -> Any:
            return slot_get(conn, type(conn))

        def set_value(conn: Any, value: Any) -> None:
            slot_set(conn, value)

    else:
        default = stored

        def get_value(conn: Any) -> Any:
            return conn.__dict__.get("socket_timeout", default)

        def set_value(conn: Any, value: Any) -> None:
            conn.__dict__["socket_timeout"] = value

    current = CURRENT_ATTEMPT.get

    def fget(conn: Any) -> Any:
        if current() is not None:
            return None
        return get_value(conn)

    return property(fget, set_value, doc="The client's socket_timeout; None inside a resilient attempt.")
