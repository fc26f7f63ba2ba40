"""A session-wide tap on everything the library emits, scanned for canary strings at the end.

The rule it enforces: no key, value or password reaches a span, span event, metric, log line
or hook event. Tests that want to exercise it use the ``CANARY_*`` strings below as keys,
values and passwords (``tests/test_canary.py`` does); any test anywhere in the session that
makes the library emit one of them fails the session.

What is collected, from the moment the plugin is configured:

- spans: an extra span processor on every ``opentelemetry.sdk`` ``TracerProvider``. Spans of
  our instrumentation scope are scanned whole (name, attributes, status description, every
  event and its attributes); other scopes' spans (contrib's ``RedisInstrumentor``, the test's
  own request spans) only for what we add to them: ``redis.resilience.*`` events and
  attributes.
- metrics: an extra ``InMemoryMetricReader`` on every ``MeterProvider``, harvested when the
  provider shuts down or at the end of the session (cumulative, so nothing is missed): metric
  names and attribute keys and values of our meter's points.
- logs: a DEBUG handler on the root logger (and the ``otel_redis_resilience`` logger set to
  DEBUG so its debug lines exist): the formatted message, exception and stack text of every
  record. Records of ``otel_redis_resilience*`` loggers are scanned; others are counted.
- hook events: a tap appended to every ``Telemetry``'s hooks, so events are built and seen
  even for a ``Resilience`` created without hooks.

Canaries are matched case-insensitively: a key upper-cased into a span name is still a leak.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

CANARY_KEY = "canary-key-7f3a"
CANARY_VALUE = "canary-value-9b2c"
CANARY_PASSWORD = "canary-pass-1d4e"
CANARY_USER = "canary-user-5e6f"
CANARIES = (CANARY_KEY, CANARY_VALUE, CANARY_PASSWORD, CANARY_USER)

SCOPE = "otel_redis_resilience"
#: Lines of this logger are seen by captures but left out of the session scan: the plugin's
#: own self-test leaks on purpose.
SELFTEST_LOGGER = "otel_redis_resilience.canary_selftest"
_OURS = "redis.resilience."


@dataclass
class Item:
    kind: str  # span, metric, log, hook
    where: str
    text: str


def leaks(text: str) -> list[str]:
    low = text.lower()
    return [c for c in CANARIES if c in low]


@dataclass
class Capture:
    """What was emitted while a :func:`capture` block ran (every thread)."""

    items: list[Item] = field(default_factory=list)
    spans: list[Any] = field(default_factory=list)
    hook_events: list[Any] = field(default_factory=list)

    def leaked(self) -> list[str]:
        return [f"{i.kind} {i.where}: {i.text!r}" for i in self.items if leaks(i.text)]

    def assert_clean(self) -> None:
        found = self.leaked()
        assert not found, "canary leaked:\n" + "\n".join(found)

    def our_spans(self) -> list[Any]:
        return [s for s in self.spans if s.instrumentation_scope and s.instrumentation_scope.name == SCOPE]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [dict(e.attributes or {}) for s in self.spans for e in s.events if e.name == name]

    def logs(self) -> list[str]:
        return [i.text for i in self.items if i.kind == "log"]


class Collector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Scanned as they arrive; only leaks are kept: holding every string of the session
        # grew the heap enough for garbage collection to stall timing-sensitive tests.
        self.scanned = 0
        self.leaked: list[Item] = []
        self.counts: Counter[str] = Counter()
        self.captures: list[Capture] = []
        self.readers: list[Any] = []
        self.harvested: set[int] = set()

    def add(self, kind: str, where: str, texts: list[str]) -> None:
        items = [Item(kind, where, t) for t in texts if t]
        with self.lock:
            self.scanned += len(items)
            self.leaked.extend(i for i in items if leaks(i.text))
            for c in self.captures:
                c.items.extend(items)

    # -- spans -------------------------------------------------------------------------

    def span(self, span: Any) -> None:
        scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
        ours = scope == SCOPE
        texts: list[str] = []
        attrs = dict(span.attributes or {})
        if ours:
            texts.append(span.name)
            texts.append(span.status.description or "")
            texts.extend(f"{k}={v}" for k, v in attrs.items())
        else:
            texts.extend(f"{k}={v}" for k, v in attrs.items() if k.startswith(_OURS))
        events = 0
        for e in span.events:
            if ours or e.name.startswith(_OURS):
                events += 1
                texts.append(e.name)
                texts.extend(f"{e.name}: {k}={v}" for k, v in (e.attributes or {}).items())
        with self.lock:
            self.counts["spans ours" if ours else "spans other"] += 1
            self.counts["span events"] += events
            for c in self.captures:
                c.spans.append(span)
        self.add("span", f"{scope}:{span.name}", texts)

    # -- metrics -----------------------------------------------------------------------

    def harvest(self, reader: Any) -> None:
        with self.lock:
            if id(reader) in self.harvested:
                return
            self.harvested.add(id(reader))
        try:
            data = reader.get_metrics_data()
        except Exception:
            return
        texts: list[str] = []
        points = 0
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                if sm.scope.name != SCOPE:
                    continue
                for m in sm.metrics:
                    for p in m.data.data_points:
                        points += 1
                        texts.append(m.name)
                        texts.extend(f"{m.name}: {k}={v}" for k, v in dict(p.attributes or {}).items())
        with self.lock:
            self.counts["metric points"] += points
        self.add("metric", "meter", texts)

    # -- logs and hooks ----------------------------------------------------------------

    def log(self, record: logging.LogRecord, texts: list[str]) -> None:
        ours = record.name.startswith(SCOPE)
        with self.lock:
            self.counts["log records ours" if ours else "log records other"] += 1
        if not ours:
            return
        if record.name == SELFTEST_LOGGER:
            items = [Item("log", record.name, t) for t in texts]
            with self.lock:
                for c in self.captures:
                    c.items.extend(items)
            return
        self.add("log", f"{record.name}:{record.levelname}", texts)

    def hook(self, event: object) -> None:
        with self.lock:
            self.counts["hook events"] += 1
            for c in self.captures:
                c.hook_events.append(event)
        self.add("hook", type(event).__name__, [repr(event)])


COLLECTOR = Collector()


@contextlib.contextmanager
def capture() -> Iterator[Capture]:
    """Everything emitted inside the block, for a test's own localised assertions."""
    cap = Capture()
    with COLLECTOR.lock:
        COLLECTOR.captures.append(cap)
    try:
        yield cap
    finally:
        with COLLECTOR.lock:
            COLLECTOR.captures.remove(cap)


def _span_tap() -> Any:
    from opentelemetry.sdk.trace import SpanProcessor

    class SpanTap(SpanProcessor):
        def on_end(self, span: Any) -> None:
            COLLECTOR.span(span)

    return SpanTap()


class _LogTap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._fmt = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            texts = [record.getMessage()]
            if record.exc_text:
                texts.append(record.exc_text)
            elif record.exc_info:
                texts.append(self._fmt.formatException(record.exc_info))
            if record.stack_info:
                texts.append(record.stack_info)
            COLLECTOR.log(record, texts)
        except Exception:
            self.handleError(record)


def _hook_tap(event: object) -> None:
    COLLECTOR.hook(event)


_undo: list[Any] = []


def _install() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from otel_redis_resilience._observe import telemetry as _telemetry

    tp_init = TracerProvider.__init__

    def traced_init(self: Any, *args: Any, **kwargs: Any) -> None:
        tp_init(self, *args, **kwargs)
        self.add_span_processor(_span_tap())

    mp_init = MeterProvider.__init__
    mp_shutdown = MeterProvider.shutdown

    def metered_init(self: Any, metric_readers: Any = (), *args: Any, **kwargs: Any) -> None:
        reader = InMemoryMetricReader()
        mp_init(self, (*metric_readers, reader), *args, **kwargs)
        self._canary_reader = reader
        with COLLECTOR.lock:
            COLLECTOR.readers.append(reader)

    def metered_shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        reader = getattr(self, "_canary_reader", None)
        if reader is not None:
            COLLECTOR.harvest(reader)
        return mp_shutdown(self, *args, **kwargs)

    tel_init = _telemetry.Telemetry.__init__

    def tapped_init(self: Any, *args: Any, **kwargs: Any) -> None:
        tel_init(self, *args, **kwargs)
        self.hooks = (*self.hooks, _hook_tap)

    TracerProvider.__init__ = traced_init  # type: ignore[method-assign]
    MeterProvider.__init__ = metered_init  # type: ignore[method-assign]
    MeterProvider.shutdown = metered_shutdown  # type: ignore[method-assign]
    _telemetry.Telemetry.__init__ = tapped_init  # type: ignore[method-assign]

    handler = _LogTap()
    root = logging.getLogger()
    root.addHandler(handler)
    ours = logging.getLogger(SCOPE)
    level = ours.level
    ours.setLevel(logging.DEBUG)

    def undo() -> None:
        TracerProvider.__init__ = tp_init  # type: ignore[method-assign]
        MeterProvider.__init__ = mp_init  # type: ignore[method-assign]
        MeterProvider.shutdown = mp_shutdown  # type: ignore[method-assign]
        _telemetry.Telemetry.__init__ = tel_init  # type: ignore[method-assign]
        root.removeHandler(handler)
        ours.setLevel(level)

    _undo.append(undo)


def pytest_configure(config: pytest.Config) -> None:
    _install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    with COLLECTOR.lock:
        readers = list(COLLECTOR.readers)
    for reader in readers:
        COLLECTOR.harvest(reader)
    found = [f"{i.kind} {i.where}: {i.text!r}" for i in COLLECTOR.leaked]
    session.config.stash[_found_key] = found
    if found and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    for undo in _undo:
        undo()
    _undo.clear()


_found_key = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    found = config.stash.get(_found_key, [])
    counts = ", ".join(f"{n} {k}" for k, n in sorted(COLLECTOR.counts.items()))
    terminalreporter.write_sep("-", "canary scan")
    terminalreporter.write_line(f"scanned {COLLECTOR.scanned} strings: {counts or 'nothing'}")
    if found:
        terminalreporter.write_line(f"CANARY LEAKED ({len(found)}): the session fails", red=True)
        for line in found[:50]:
            terminalreporter.write_line("  " + line[:500])
    else:
        terminalreporter.write_line("no canary key, value or password found")
