"""``Resilience``: one per Redis endpoint, shared by every thread and task."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from opentelemetry import metrics, trace
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._cluster import Cluster, cluster_endpoint, cluster_kind
from ._decide.breaker import BreakerState
from ._decide.config import BreakerPolicy, RetryPolicy, validate_deadline, validate_request_deadline
from ._drive.aio import AsyncDriver
from ._drive.core import Core
from ._drive.flows import probe_flow
from ._drive.sync import SyncDriver
from ._errors import ConfigurationError
from ._fallback import _MISSING, LastKnownGood, LastKnownGoodPolicy, make_fallback_decorator
from ._observe.events import Endpoint, Hook
from ._observe.telemetry import Telemetry
from ._request import RequestContext
from ._scope import RequestScope
from ._writebehind import WriteBehind, WriteBehindConfig, WriteBehindJournal

_all_cores: weakref.WeakSet[Core] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for core in list(_all_cores):
        core.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

AnyClient = (
    redis.Redis | redis.asyncio.Redis | redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster
)
F = TypeVar("F", bound=Callable[..., Any])


def _endpoint(pool: Any) -> Endpoint:
    kw = pool.connection_kwargs
    db = int(kw.get("db", 0) or 0)
    if kw.get("path"):
        return Endpoint(str(kw["path"]), None, db)
    return Endpoint(str(kw.get("host", "localhost")), int(kw.get("port", 6379)), db)


class Resilience:
    """Resilience for one Redis endpoint: a circuit breaker, safe retries and deadlines.

    Create one per Redis client at start-up and share it across threads or
    tasks. Each request then opens a scope with :meth:`request`, which yields
    a handle with redis-py's whole command API.

    Args:
        client: A ``redis.Redis`` or ``redis.asyncio.Redis``, or a Redis Cluster
            client (``redis.cluster.RedisCluster``, ``redis.asyncio.cluster.RedisCluster``:
            one breaker per primary node, see docs/configuration.md). Its own retries
            are switched off (``max_attempts`` here is the single retry layer)
            and its connection class gets deadline and send-tracking hooks.
            For an asyncio client, ``socket_timeout`` does not apply inside an
            attempt: this library bounds every attempt itself, by cancelling it
            at its deadline (one watchdog timer per event loop), because
            redis-py's ``asyncio.wait_for`` can swallow a cancellation on 3.11.
            The client called directly keeps its ``socket_timeout``. An idle
            pooled connection the server already closed is replaced before an
            attempt writes on it, within the attempt's deadline.
        retry: How failed attempts are retried.
        breaker: When the breaker opens and how it recovers.
        deadline: Default total Redis time per request scope, in seconds
            (``None``: no scope deadline; attempts are still bounded by
            ``RetryPolicy.attempt_timeout``).
        tracer_provider: Where spans go (default: the global provider).
        meter_provider: Where metrics go (default: the global provider).
        hooks: Callables that receive every event (see :class:`Hook`).
        capture_statement: Record ``db.query.text`` on spans, sanitised
            (``SET ? ?``: never a key or a value).
        last_known_good: Keep a bounded in-process copy of recent successful
            reads, served by ``handle.last_known_good()`` views while Redis is down.
        write_behind: Enable the durable write-behind journal for
            ``handle.write_behind()`` views. The journal is opened (and checked)
            here: a corrupt or unreadable journal raises ``JournalCorruptError``
            now, and one left by a crashed process is adopted and replayed.
    """

    def __init__(
        self,
        client: AnyClient,
        *,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        deadline: float | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        hooks: Sequence[Hook] = (),
        capture_statement: bool = False,
        last_known_good: LastKnownGoodPolicy | None = None,
        write_behind: WriteBehindConfig | None = None,
    ) -> None:
        # The one place sync and asyncio part: everything that differs is the driver's.
        self._driver: SyncDriver | AsyncDriver
        kind = cluster_kind(client)
        if kind is not None:
            self._driver = AsyncDriver() if kind == "async" else SyncDriver()
        elif isinstance(client, redis.asyncio.Redis):
            self._driver = AsyncDriver()
        elif isinstance(client, redis.Redis):
            self._driver = SyncDriver()
        else:
            raise ConfigurationError(
                "Resilience(client) needs a redis.Redis, a redis.asyncio.Redis or a RedisCluster "
                f"(redis.cluster or redis.asyncio.cluster), got {type(client).__module__}."
                f"{type(client).__qualname__}"
            )
        if retry is None:
            retry = RetryPolicy()
        if breaker is None:
            breaker = BreakerPolicy()
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"Resilience(retry=...) must be a RetryPolicy, got {retry!r}")
        if not isinstance(breaker, BreakerPolicy):
            raise ConfigurationError(f"Resilience(breaker=...) must be a BreakerPolicy, got {breaker!r}")
        self._deadline = validate_deadline("Resilience", deadline)
        if callable(hooks) or isinstance(hooks, str | bytes) or not isinstance(hooks, Iterable):
            raise ConfigurationError(
                f"Resilience(hooks=...) must be a sequence of callables, got {hooks!r}"
                + (" (wrap a single hook in a list: hooks=[hook])" if callable(hooks) else "")
            )
        hooks = tuple(hooks)  # once: an iterator would be used up by this check
        for hook in hooks:
            if not callable(hook):
                raise ConfigurationError(f"Resilience(hooks=...) entries must be callable, got {hook!r}")
        if not isinstance(capture_statement, bool):
            raise ConfigurationError(
                f"Resilience(capture_statement=...) must be True or False, got {capture_statement!r}"
            )
        if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
            raise ConfigurationError(
                f"Resilience(tracer_provider=...) must be a TracerProvider, got {tracer_provider!r}"
            )
        if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
            raise ConfigurationError(
                f"Resilience(meter_provider=...) must be a MeterProvider, got {meter_provider!r}"
            )
        self.client = client
        self.retry_policy = retry
        self.breaker_policy = breaker
        plain: Any = client
        self.endpoint = cluster_endpoint(client) if kind is not None else _endpoint(plain.connection_pool)
        self._telemetry = Telemetry(
            self.endpoint,
            hooks=hooks,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            capture_statement=capture_statement,
        )
        if last_known_good is not None and not isinstance(last_known_good, LastKnownGoodPolicy):
            raise ConfigurationError(
                f"Resilience(last_known_good=...) must be a LastKnownGoodPolicy, got {last_known_good!r}"
            )
        self._core = Core(
            endpoint=self.endpoint,
            retry=retry,
            breaker=breaker,
            telemetry=self._telemetry,
            start_probe=self._start_probe,
            lkg=None if last_known_good is None else LastKnownGood(last_known_good),
        )
        #: Bumped by close(): a probe loop started before it stops, and leaves the
        #: probe claim to close() (which already released it).
        self._generation = 0
        self._cluster: Cluster | None = None
        if kind is not None:
            # The cluster's own core serves views (fallbacks, last-known-good) only;
            # commands go through one core per node, each with its own telemetry.
            self._cluster = Cluster(
                client,
                is_async=kind == "async",
                retry=retry,
                breaker=breaker,
                telemetry=self._telemetry,
                make_telemetry=lambda endpoint: Telemetry(
                    endpoint,
                    hooks=hooks,
                    tracer_provider=tracer_provider,
                    meter_provider=meter_provider,
                    capture_statement=capture_statement,
                ),
                driver=self._driver,
                alive=lambda: self._generation,
            )
            if write_behind is not None:
                raise ConfigurationError(
                    "Resilience(write_behind=...) is not supported on a Redis Cluster client yet: "
                    "journaled writes would have to replay to whichever node owns each key"
                )
        else:
            self._telemetry.watch_state(self._core.state)
        _all_cores.add(self._core)
        if write_behind is not None:
            if not isinstance(write_behind, WriteBehindConfig):
                raise ConfigurationError(
                    f"Resilience(write_behind=...) must be a WriteBehindConfig, got {write_behind!r}"
                )
            self._core.write_behind = WriteBehind(
                write_behind, self._core, client, is_async=self._driver.is_async
            )
        self._handle_cls = (
            self._driver.handle_class(type(client)) if self._cluster is None else self._cluster.handle_class
        )
        self._closed = False
        #: Guards _closed and _generation only; never held across I/O.
        self._life_lock = threading.Lock()
        self._install()
        # After _install: the replayer's first run must use hooked, non-retrying connections.
        self._driver.start_write_behind(self._core)

    # -- set-up -----------------------------------------------------------------

    def _install(self) -> None:
        if self._cluster is not None:
            self._cluster.install()
            return
        plain: Any = self.client
        pool: Any = plain.connection_pool
        no_retry = Retry(NoBackoff(), 0)
        pool.connection_kwargs["retry"] = no_retry
        # Inside an attempt its own bound replaces the client's socket_timeout (sync:
        # DeadlineSocket; asyncio: the watchdog, the hooked connection reading its
        # socket_timeout as None); everywhere else the client keeps it (see
        # _drive/connection.py). So with attempt_timeout=None the client's socket_timeout
        # becomes the attempt's bound, and "None" still means "the client's". The
        # pool's kwargs are left as they are: a second Resilience finds the same value.
        socket_timeout = pool.connection_kwargs.get("socket_timeout")
        if socket_timeout:
            self._core.client_timeout = float(socket_timeout)
            if self._core.attempt_timeout is None:
                self._core.attempt_timeout = float(socket_timeout)
        checks = bool(pool.connection_kwargs.get("health_check_interval"))
        pool.connection_class = self._driver.hooked_class(pool.connection_class, checks)
        # Connections made before us carry the old class and retry settings.
        pool.reset()
        conn = getattr(self.client, "connection", None)
        if conn is not None:
            conn.__class__ = self._driver.hooked_class(type(conn), checks)
            conn.retry = no_retry
            # reset() forgot that the client holds this one.
            self._driver.keep_in_use(pool, conn)

    # -- public API ---------------------------------------------------------------

    @property
    def write_behind_journal(self) -> WriteBehindJournal | None:
        """The write-behind journal's operator view, or None without write-behind.

        :class:`WriteBehindJournal`: ``pending_count()``, ``oldest_entry_age()``,
        ``dead_entries()`` and ``wait_drained(timeout)``.
        """
        wb = self._core.write_behind
        return None if wb is None else wb.journal

    def replay_now(self) -> None:
        """Ask the write-behind replayer to run now (it also runs by itself once the breaker leaves open)."""
        if self._core.write_behind is not None:
            self._core.write_behind.kick()

    @property
    def is_async(self) -> bool:
        """Whether this wraps an asyncio client."""
        return self._driver.is_async

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker's current state; on a cluster, the worst over its nodes."""
        if self._cluster is not None:
            return self._cluster.worst()
        return self._core.breaker.state

    @property
    def breaker_states(self) -> dict[str, BreakerState]:
        """Every breaker's state, keyed ``"host:port"``: one per primary node on a cluster,
        one entry for a single endpoint."""
        if self._cluster is not None:
            return self._cluster.states()
        return {str(self.endpoint): self._core.breaker.state}

    def _cores(self, node: str | None) -> list[Any]:
        if self._cluster is not None:
            return self._cluster.cores(node)
        if node is not None and node != str(self.endpoint):
            raise ConfigurationError(f"no breaker for node {node!r} (this Resilience guards {self.endpoint})")
        return [self._core]

    def force_open(self, node: str | None = None) -> None:
        """Open the breaker and keep it open (no probes) until :meth:`reset`. For operators.

        Args:
            node: On a cluster, the ``"host:port"`` of one primary; None: every breaker.
        """
        for core in self._cores(node):
            core.force_open(time.monotonic())

    def reset(self, node: str | None = None) -> None:
        """Close the breaker and forget its history. For operators.

        Args:
            node: On a cluster, the ``"host:port"`` of one primary; None: every breaker.
        """
        for core in self._cores(node):
            core.reset(time.monotonic())

    def request(self, *, deadline: float | None = None) -> RequestContext[Any]:
        """Open a request scope; use ``with`` (sync client) or ``async with`` (asyncio client).

        Args:
            deadline: Total Redis time for this scope in seconds, attempts and
                backoff included; defaults to the ``Resilience`` deadline.
        """
        validate_request_deadline("request", deadline)
        return RequestContext(self, self._deadline if deadline is None else deadline)

    def handle(self, scope: RequestScope | None = None) -> Any:
        """A resilient handle outside any request scope (no deadline), e.g. for background jobs."""
        if self._closed:
            self._reopen()
        h: Any = object.__new__(self._handle_cls)
        h.__dict__.update(self.client.__dict__)
        h._orr_core = self._core
        h._orr_scope = scope
        if self._cluster is not None:
            self._cluster.fill(h)
        return h

    def fallback(self, *, value: Any = _MISSING, func: Callable[..., Any] | None = None) -> Callable[[F], F]:
        """Decorate a function (sync or async) to return a fallback when Redis is unavailable.

        ``fallback(value=x)`` returns ``x``; ``fallback(func=f)`` returns
        ``f(*args, **kwargs)`` called with the decorated function's arguments
        (awaited when both are coroutine functions). Only unavailability falls
        back: :class:`RedisUnavailable` and redis-py's connection and timeout
        errors. Every other error propagates. Each fallback is recorded (span
        event ``redis.resilience.fallback``, metric ``redis.resilience.fallbacks``).
        """
        return make_fallback_decorator(self._telemetry, value=value, func=func)

    def close(self) -> None:
        """Stop background work and release what it holds; the Resilience stays usable.

        Stops the background probe and the write-behind replayer and closes the
        write-behind journal. Does not close the client (you own it). Idempotent.
        Call it when no request is using this Resilience (at shutdown).

        The next request scope (or :meth:`handle`) re-opens what ``close()``
        released: the journal is opened (and checked) again, entries still pending
        are replayed, and the probe may run again. So a lifespan shutdown followed
        by a new startup (two ``with TestClient(app):`` sessions in a row) works.
        """
        with self._life_lock:
            if self._closed:
                return
            self._closed = True
            self._generation += 1
            # Taken under the lock: a concurrent re-open installs a fresh one, never ours to close.
            wb = self._core.write_behind
        if wb is not None:
            wb.close()
        self._driver.stop_probe()
        # A probe cut off with its event loop never runs its own clean-up: release its
        # claim here, or no probe could start again after the next use re-opens.
        self._core.probe_finished()

    def _reopen(self) -> None:
        """Undo :meth:`close` at the next use: a fresh journal and replayer, probes allowed."""
        old = self._core.write_behind
        # Opened outside the lock (file I/O); a concurrent re-opener's extra one is closed.
        fresh = None
        if old is not None:
            fresh = WriteBehind(old.config, self._core, self.client, is_async=self._driver.is_async)
        with self._life_lock:
            won = self._closed
            if won:
                if fresh is not None:
                    self._core.write_behind = fresh
                self._closed = False
        if not won and fresh is not None:
            fresh.close()

    # -- background probe ---------------------------------------------------------

    def _start_probe(self) -> None:
        if self._closed:
            self._core.probe_finished()
            return
        generation = self._generation
        flow = probe_flow(self._core, self.breaker_policy, lambda: generation == self._generation)
        if not self._driver.start_probe(flow, self.client, self.endpoint):
            # No event loop to run it on (an asyncio client used from sync code): let
            # the next rejection try again.
            self._core.probe_finished()

    def __repr__(self) -> str:
        return f"<Resilience {self.endpoint} breaker={self.breaker_state.value}>"
