"""A fault-injecting TCP proxy to put between a Redis client and a real redis-server.

The failures this library must survive are network-shaped: a slow link, a server that
accepts connections and then never answers, connections reset mid-flight, a port that
refuses connects, replies lost after the command already ran.  Killing or pausing
redis-server covers only some of them, so :class:`FaultProxy` sits in the middle and
produces the rest on demand, switching behaviour at runtime for existing and new
connections alike.

Implementation: one daemon thread runs a ``selectors`` event loop over non-blocking
sockets.  A single thread keeps mode switches atomic with respect to the traffic (there
is no window where half the pumps see the old mode) and makes shutdown trivial: one
thread to wake and join.
"""

from __future__ import annotations

import contextlib
import errno
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, get_args

__all__ = ["FaultProxy", "ProxyMode"]

ProxyMode = Literal["pass", "latency", "blackhole", "reset", "refuse", "drop_replies"]

# Parameters each mode accepts (anything else is a typo we want to hear about).
_MODE_PARAMS: dict[str, frozenset[str]] = {
    "pass": frozenset(),
    "latency": frozenset({"latency", "jitter"}),
    "blackhole": frozenset(),
    "reset": frozenset(),
    "refuse": frozenset(),
    "drop_replies": frozenset({"count", "sever"}),
}

_RECV_SIZE = 65536
# Stop reading from a side once this much data is queued for the other side, so a slow
# (or latency-delayed) reader cannot make the proxy buffer without bound.
_MAX_PENDING = 4 * 1024 * 1024
# Upper bound on how long any internal wait may take, so nothing can hang a test run.
_SYNC_TIMEOUT = 5.0
# The event loop never sleeps longer than this, as a safety net against a lost wakeup.
_MAX_SELECT = 0.5
# When re-opening the listener after "refuse", retry this long if the port is busy.
_REBIND_WINDOW = 2.0


def _rst_close(sock: socket.socket) -> None:
    """Close ``sock`` so the peer gets a TCP RST instead of an orderly FIN.

    SO_LINGER on with a zero timeout makes close() abort the connection: the peer's
    next recv/send fails with ECONNRESET, which is what a crashed server or a middlebox
    dropping state looks like.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    # Without TCP_NODELAY, Nagle + delayed ACKs can add ~40 ms to small Redis replies,
    # which would swamp the latencies tests inject on purpose.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class _ModeState:
    mode: str = "pass"
    latency: float = 0.0
    jitter: float = 0.0
    count: int | None = None
    sever: bool = False


@dataclass
class _Pipe:
    """One direction of a connection: chunks waiting to be written to the other side."""

    queue: deque[tuple[float, memoryview]] = field(default_factory=deque)
    pending: int = 0  # bytes queued
    eof: bool = False  # the source side has closed
    blocked: bool = False  # last send() to the destination would block; wait for writability
    last_due: float = 0.0  # keeps due times monotonic so jitter cannot reorder chunks

    def push(self, due: float, data: bytes) -> None:
        due = max(due, self.last_due)
        self.last_due = due
        self.queue.append((due, memoryview(data)))
        self.pending += len(data)

    def clear(self) -> None:
        self.queue.clear()
        self.pending = 0
        self.blocked = False


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None
    connecting: bool = False
    # Set for every connection that lived through "blackhole"; such connections are
    # closed when the mode changes away from it (their streams are out of sync).
    blackholed: bool = False
    up: _Pipe = field(default_factory=_Pipe)  # client -> server
    down: _Pipe = field(default_factory=_Pipe)  # server -> client
    closed: bool = False
    # Set when "drop_replies" with sever=True dropped a chunk of this connection: nothing
    # from the server reaches this client again (a link that died mid-reply).
    severed: bool = False
    # Events each socket is currently registered for (0 = not registered).
    client_events: int = 0
    upstream_events: int = 0


class FaultProxy:
    """Fault-injecting TCP proxy in front of ``upstream_host:upstream_port``.

    Listens on a free ``127.0.0.1`` port (:attr:`host`, :attr:`port`); point the client
    under test at it.  Switch behaviour with :meth:`set_mode`; the switch applies to
    existing and new connections and has taken effect when ``set_mode`` returns.

    Modes:

    ``"pass"``
        Forward bytes both ways.
    ``"latency"`` (``latency: float``, ``jitter: float = 0.0``)
        Forward both ways, holding every chunk for ``latency`` seconds plus a uniform
        random ``0..jitter`` extra, **in each direction** -- so a request/response round
        trip takes at least ``2 * latency`` more.  Order is preserved per direction.
    ``"blackhole"``
        A hung server: connections (existing and new) stay open, everything the client
        sends is read and discarded, nothing is ever sent back, nothing is closed.  New
        connections are accepted but never connected upstream.  Leaving blackhole
        closes every connection that was blackholed, with RST, because their request and
        reply streams are out of sync; clients see a reset on next use.
    ``"reset"``
        Every existing connection is closed with RST; new connections are accepted and
        immediately reset.
    ``"refuse"``
        The listening socket is closed, so connects fail with ECONNREFUSED; existing
        connections are reset.  Any other mode re-opens the listener on the same port.
    ``"drop_replies"`` (``count: int | None = None``, ``sever: bool = False``)
        Client-to-server bytes are forwarded (commands run on the server) but
        server-to-client chunks (``recv()`` results) are dropped: the next ``count``
        ones, after which traffic flows normally again, or all of them when ``count`` is
        None.  A chunk may hold several pipelined replies or part of a big one.  With
        ``sever=True`` a connection that lost a chunk never passes anything from the
        server to the client again (the rest of a big reply included), so the client
        sees the silence of a dead link instead of a reply cut in the middle; other and
        new connections flow normally once ``count`` chunks were dropped.

    While forwarding, if the server closes or resets a connection, the proxy does the
    same to the client.  If the upstream cannot be reached when a client connects
    (server down), the client's connection is accepted and then reset.

    Counters: :attr:`connections_accepted`, :attr:`replies_dropped`.
    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    host: str = "127.0.0.1"

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._port = 0
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._stopping = False

        # Requested vs applied mode: set_mode() writes the request under the lock, the
        # loop thread applies it and bumps _applied_gen, set_mode() waits for that.
        self._cond = threading.Condition()
        self._requested = _ModeState()
        self._req_gen = 1
        self._applied_gen = 0
        self._apply_error: BaseException | None = None

        # Loop-thread state.
        self._state = _ModeState()
        self._drop_remaining: int | None = None
        self._accepted = 0
        self._dropped = 0

    # -- public API -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The proxy's listening port (stable for its whole life, across ``"refuse"``)."""
        if not self._port:
            raise RuntimeError("FaultProxy.port is only known after start()")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` pointing at the proxy."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def mode(self) -> str:
        """The most recently requested mode."""
        with self._cond:
            return self._requested.mode

    @property
    def connections_accepted(self) -> int:
        """Client connections accepted so far (in every mode, including reset ones)."""
        return self._accepted

    @property
    def replies_dropped(self) -> int:
        """Server-to-client chunks dropped by ``"drop_replies"`` so far."""
        return self._dropped

    @property
    def open_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._conns)

    def start(self) -> Self:
        """Bind the listener and start the event-loop thread."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._open_listener(0)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy-{self._port}", daemon=True)
        self._thread.start()
        self._wait_applied(self._req_gen)
        return self

    def stop(self) -> None:
        """Close the listener and every connection and join the thread.  Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(_SYNC_TIMEOUT)
        if thread.is_alive():  # pragma: no cover - defensive, should never happen
            # Daemon thread: it cannot keep the process alive; just release resources.
            self._teardown()
        self._thread = None

    def set_mode(self, mode: ProxyMode, **params: Any) -> None:
        """Switch behaviour; see the class docstring for modes and parameters.

        Applies to existing connections too, and has taken effect on return (e.g. after
        ``set_mode("reset")`` every existing connection has been reset).
        """
        state = self._validate(mode, params)
        with self._cond:
            self._requested = state
            self._req_gen += 1
            gen = self._req_gen
        if self._thread is None:
            return  # applied by the loop when start() runs
        self._wake()
        self._wait_applied(gen)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self._port} -> {self.upstream_host}:{self.upstream_port} "
            f"mode={self.mode} open={len(self._conns)}>"
        )

    # -- control-plane helpers ------------------------------------------------------------

    @staticmethod
    def _validate(mode: str, params: dict[str, Any]) -> _ModeState:
        if mode not in _MODE_PARAMS:
            raise ValueError(f"unknown proxy mode {mode!r}; expected one of {get_args(ProxyMode)}")
        unknown = set(params) - _MODE_PARAMS[mode]
        if unknown:
            raise TypeError(f"mode {mode!r} does not take {sorted(unknown)}")
        if mode == "latency":
            if "latency" not in params:
                raise TypeError("mode 'latency' requires latency=<seconds>")
            latency = float(params["latency"])
            jitter = float(params.get("jitter", 0.0))
            if latency < 0 or jitter < 0:
                raise ValueError("latency and jitter must be >= 0")
            return _ModeState(mode, latency=latency, jitter=jitter)
        if mode == "drop_replies":
            count = params.get("count")
            if count is not None and (not isinstance(count, int) or count < 0):
                raise ValueError("count must be a non-negative int or None")
            sever = params.get("sever", False)
            if not isinstance(sever, bool):
                raise ValueError("sever must be a bool")
            return _ModeState(mode, count=count, sever=sever)
        return _ModeState(mode)

    def _wait_applied(self, gen: int) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._applied_gen >= gen or self._thread is None or not self._thread.is_alive(),
                timeout=_SYNC_TIMEOUT,
            )
            error, self._apply_error = self._apply_error, None
        if error is not None:
            raise RuntimeError(f"FaultProxy failed to switch mode: {error}") from error
        if not ok:
            raise RuntimeError("FaultProxy event loop did not apply the mode change in time")

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full buffer = a wakeup is already pending
                self._wake_w.send(b"x")

    def _open_listener(self, port: int) -> None:
        deadline = time.monotonic() + _REBIND_WINDOW
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # SO_REUSEADDR lets us re-bind the same port after "refuse" even while
            # connections that used it sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
                break
            except OSError as e:
                sock.close()
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.listen(128)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        self._listener = sock
        assert self._sel is not None
        self._sel.register(sock, selectors.EVENT_READ, "listener")

    def _close_listener(self) -> None:
        if self._listener is not None:
            assert self._sel is not None
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    # -- event loop (runs on the proxy thread only) ----------------------------------------

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                self._apply_mode()
                for key, mask in sel.select(self._next_timeout()):
                    self._dispatch(key.data, mask)
                now = time.monotonic()
                for conn in list(self._conns):
                    self._service(conn, now)
        finally:
            self._teardown()
            with self._cond:
                self._cond.notify_all()

    def _apply_mode(self) -> None:
        with self._cond:
            if self._applied_gen == self._req_gen:
                return
            state, gen = self._requested, self._req_gen
        try:
            self._state = state
            self._drop_remaining = state.count
            if state.mode == "blackhole":
                for conn in self._conns:
                    conn.blackholed = True
                    # Data already in flight would be "sent back"; a hung server sends nothing.
                    conn.up.clear()
                    conn.down.clear()
            else:
                for conn in [c for c in self._conns if c.blackholed]:
                    self._close_conn(conn, rst=True)
            if state.mode in ("reset", "refuse"):
                for conn in list(self._conns):
                    self._close_conn(conn, rst=True)
            if state.mode == "refuse":
                self._close_listener()
            elif self._listener is None:
                self._open_listener(self._port)
        except Exception as e:  # surfaced to set_mode() rather than killing the loop
            self._apply_error = e
        with self._cond:
            self._applied_gen = gen
            self._cond.notify_all()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        timeout = _MAX_SELECT
        for conn in self._conns:
            for pipe in (conn.up, conn.down):
                if pipe.queue and not pipe.blocked:
                    timeout = min(timeout, max(0.0, pipe.queue[0][0] - now))
        return timeout

    def _dispatch(self, data: Any, mask: int) -> None:
        if data == "wake":
            assert self._wake_r is not None
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
        elif data == "listener":
            self._accept()
        else:
            conn, side = data
            if conn.closed:
                return  # closed earlier in this same batch of events
            if side == "client":
                if mask & selectors.EVENT_WRITE:
                    conn.down.blocked = False
                if mask & selectors.EVENT_READ:
                    self._read_client(conn)
            else:
                if conn.connecting:
                    self._finish_connect(conn)
                    return
                if mask & selectors.EVENT_WRITE:
                    conn.up.blocked = False
                if mask & selectors.EVENT_READ:
                    self._read_upstream(conn)

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._accepted += 1
            mode = self._state.mode
            if mode == "reset":
                _rst_close(sock)
                continue
            _tune(sock)
            conn = _Conn(client=sock)
            self._conns.add(conn)
            if mode == "blackhole":
                conn.blackholed = True  # never connected upstream
            else:
                self._connect_upstream(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(up)
        conn.upstream = up
        err = up.connect_ex((self.upstream_host, self.upstream_port))
        if err in (0, errno.EISCONN):
            conn.connecting = False
        elif err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            conn.connecting = True
        else:
            # Upstream down: the client sees its (accepted) connection reset.
            self._close_conn(conn, rst=True)

    def _finish_connect(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._close_conn(conn, rst=True)
        else:
            conn.connecting = False

    def _recv(self, conn: _Conn, sock: socket.socket) -> bytes | None:
        """recv() that closes the connection (mirroring RST) on errors; None = nothing."""
        try:
            return sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._close_conn(conn, rst=True)
            return None

    def _delay(self) -> float:
        state = self._state
        if state.mode != "latency":
            return 0.0
        return state.latency + (random.uniform(0.0, state.jitter) if state.jitter else 0.0)

    def _read_client(self, conn: _Conn) -> None:
        data = self._recv(conn, conn.client)
        if data is None:
            return
        if not data:
            conn.up.eof = True
            return
        if conn.blackholed:
            return  # read and discard: a hung server swallows requests
        conn.up.push(time.monotonic() + self._delay(), data)

    def _read_upstream(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        data = self._recv(conn, conn.upstream)
        if data is None:
            return
        if not data:
            conn.down.eof = True
            return
        if conn.blackholed or conn.severed:
            return
        if self._state.mode == "drop_replies" and (self._drop_remaining is None or self._drop_remaining > 0):
            self._dropped += 1
            if self._drop_remaining is not None:
                self._drop_remaining -= 1
            conn.severed = self._state.sever
            return
        conn.down.push(time.monotonic() + self._delay(), data)

    def _flush(self, conn: _Conn, pipe: _Pipe, dst: socket.socket, now: float) -> None:
        while pipe.queue and not pipe.blocked:
            due, buf = pipe.queue[0]
            if due > now:
                return
            try:
                sent = dst.send(buf)
            except (BlockingIOError, InterruptedError):
                pipe.blocked = True
                return
            except OSError:
                self._close_conn(conn, rst=True)
                return
            pipe.pending -= sent
            if sent < len(buf):
                pipe.queue[0] = (due, buf[sent:])
                pipe.blocked = True
                return
            pipe.queue.popleft()

    def _service(self, conn: _Conn, now: float) -> None:
        """Flush what is due, close finished connections, update selector interest."""
        if conn.closed:
            return
        if conn.upstream is not None and not conn.connecting:
            self._flush(conn, conn.up, conn.upstream, now)
        if not conn.closed:
            self._flush(conn, conn.down, conn.client, now)
        if conn.closed:
            return
        # Client went away and everything it sent has been delivered: done.
        if conn.up.eof and not conn.up.queue:
            self._close_conn(conn, rst=False)
            return
        # Server closed: pass the close on once its last bytes reached the client.  Not
        # for blackholed connections, which must stay open whatever happens upstream.
        if conn.down.eof and not conn.down.queue and not conn.blackholed:
            self._close_conn(conn, rst=False)
            return

        client_ev = 0
        if not conn.up.eof and conn.up.pending < _MAX_PENDING:
            client_ev |= selectors.EVENT_READ
        if conn.down.blocked:
            client_ev |= selectors.EVENT_WRITE
        conn.client_events = self._reregister(conn.client, conn.client_events, client_ev, (conn, "client"))

        if conn.upstream is not None:
            up_ev = 0
            if conn.connecting:
                up_ev = selectors.EVENT_WRITE
            else:
                if not conn.down.eof and conn.down.pending < _MAX_PENDING:
                    up_ev |= selectors.EVENT_READ
                if conn.up.blocked:
                    up_ev |= selectors.EVENT_WRITE
            conn.upstream_events = self._reregister(
                conn.upstream, conn.upstream_events, up_ev, (conn, "upstream")
            )

    def _reregister(self, sock: socket.socket, current: int, wanted: int, data: Any) -> int:
        sel = self._sel
        assert sel is not None
        if wanted == current:
            return current
        if current and not wanted:
            sel.unregister(sock)
        elif not current:
            sel.register(sock, wanted, data)
        else:
            sel.modify(sock, wanted, data)
        return wanted

    def _close_conn(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        sel = self._sel
        for sock, events in ((conn.client, conn.client_events), (conn.upstream, conn.upstream_events)):
            if sock is None:
                continue
            if events and sel is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.unregister(sock)
            if rst:
                _rst_close(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
        conn.client_events = conn.upstream_events = 0

    def _teardown(self) -> None:
        for conn in list(self._conns):
            self._close_conn(conn, rst=False)
        self._close_listener()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._wake_r = self._wake_w = None
        if self._sel is not None:
            with contextlib.suppress(OSError):
                self._sel.close()
            self._sel = None
