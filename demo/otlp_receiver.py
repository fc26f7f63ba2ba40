"""A real OTLP/HTTP receiver, for the demo and the tests: what the SDK exporters actually put on the wire.

:class:`OTLPReceiver` is a threaded ``http.server`` on a free ``127.0.0.1`` port. It
accepts ``POST /v1/traces`` and ``POST /v1/metrics`` as binary protobuf (optionally
gzip- or deflate-compressed, as the OTLP/HTTP exporters send it), decodes them with the
``opentelemetry.proto`` messages and keeps flattened, easy-to-assert records:
:class:`SpanRecord` and :class:`MetricPoint`. Every request is answered ``200`` with the
proper (empty) ``Export*ServiceResponse``; anything it cannot decode gets a ``400`` and
is remembered in :attr:`OTLPReceiver.errors`, so a test can assert there were none.

:func:`format_trace_tree` renders one trace as an indented text tree (span, duration,
key attributes, events) for humans.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = [
    "EventRecord",
    "MetricPoint",
    "OTLPReceiver",
    "SpanRecord",
    "decode_attributes",
    "format_trace_tree",
]

TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
# Refuse absurd bodies instead of reading them into memory.
_MAX_BODY = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------
# decoded records
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventRecord:
    name: str
    time_unix_nano: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanRecord:
    """One span as decoded from an ``ExportTraceServiceRequest``; ids are lowercase hex."""

    name: str
    trace_id: str
    span_id: str
    #: ``None`` for a root span.
    parent_span_id: str | None
    #: ``"INTERNAL"``, ``"SERVER"``, ``"CLIENT"``, ``"PRODUCER"``, ``"CONSUMER"`` or ``"UNSPECIFIED"``.
    kind: str
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: dict[str, Any]
    events: list[EventRecord]
    #: ``"UNSET"``, ``"OK"`` or ``"ERROR"``.
    status: str
    status_message: str
    scope_name: str
    scope_version: str
    resource: dict[str, Any]

    @property
    def duration_ms(self) -> float:
        return (self.end_time_unix_nano - self.start_time_unix_nano) / 1e6

    def events_named(self, name: str) -> list[EventRecord]:
        return [e for e in self.events if e.name == name]


@dataclass(frozen=True)
class MetricPoint:
    """One data point of one metric from an ``ExportMetricsServiceRequest``.

    ``value`` is set for gauges and sums; ``count``/``sum``/``bucket_counts``/
    ``explicit_bounds`` for histograms.
    """

    name: str
    #: ``"gauge"``, ``"sum"``, ``"histogram"``, ``"exponential_histogram"`` or ``"summary"``.
    type: str
    unit: str
    attributes: dict[str, Any]
    time_unix_nano: int
    start_time_unix_nano: int
    scope_name: str
    value: float | int | None = None
    is_monotonic: bool | None = None
    #: ``"CUMULATIVE"``, ``"DELTA"`` or ``None`` (gauges).
    temporality: str | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------
def _any_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return decode_attributes(v.kvlist_value.values)
    return getattr(v, which)


def decode_attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP ``KeyValue`` list -> plain dict (arrays become lists)."""
    return {kv.key: _any_value(kv.value) for kv in kvs}


def _hex(b: bytes) -> str:
    return b.hex()


_SPAN_KIND_PREFIX = "SPAN_KIND_"
_STATUS_PREFIX = "STATUS_CODE_"


def _decode_spans(req: ExportTraceServiceRequest) -> list[SpanRecord]:
    out: list[SpanRecord] = []
    for rs in req.resource_spans:
        resource = decode_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                kind = trace_pb2.Span.SpanKind.Name(s.kind).removeprefix(_SPAN_KIND_PREFIX)
                status = trace_pb2.Status.StatusCode.Name(s.status.code).removeprefix(_STATUS_PREFIX)
                out.append(
                    SpanRecord(
                        name=s.name,
                        trace_id=_hex(s.trace_id),
                        span_id=_hex(s.span_id),
                        parent_span_id=_hex(s.parent_span_id) or None,
                        kind=kind,
                        start_time_unix_nano=s.start_time_unix_nano,
                        end_time_unix_nano=s.end_time_unix_nano,
                        attributes=decode_attributes(s.attributes),
                        events=[
                            EventRecord(e.name, e.time_unix_nano, decode_attributes(e.attributes))
                            for e in s.events
                        ],
                        status=status,
                        status_message=s.status.message,
                        scope_name=ss.scope.name,
                        scope_version=ss.scope.version,
                        resource=resource,
                    )
                )
    return out


def _temporality(value: int) -> str:
    return metrics_pb2.AggregationTemporality.Name(value).removeprefix("AGGREGATION_TEMPORALITY_")


def _number(dp: metrics_pb2.NumberDataPoint) -> float | int | None:
    which = dp.WhichOneof("value")
    return None if which is None else getattr(dp, which)


def _decode_metrics(req: ExportMetricsServiceRequest) -> list[MetricPoint]:
    out: list[MetricPoint] = []
    for rm in req.resource_metrics:
        resource = decode_attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            scope = sm.scope.name
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                common = {"name": m.name, "type": kind or "", "unit": m.unit, "scope_name": scope}
                if kind in ("gauge", "sum"):
                    data = getattr(m, kind)
                    for dp in data.data_points:
                        out.append(
                            MetricPoint(
                                **common,
                                attributes=decode_attributes(dp.attributes),
                                time_unix_nano=dp.time_unix_nano,
                                start_time_unix_nano=dp.start_time_unix_nano,
                                value=_number(dp),
                                is_monotonic=data.is_monotonic if kind == "sum" else None,
                                temporality=_temporality(data.aggregation_temporality)
                                if kind == "sum"
                                else None,
                                resource=resource,
                            )
                        )
                elif kind == "histogram":
                    for hdp in m.histogram.data_points:
                        out.append(
                            MetricPoint(
                                **common,
                                attributes=decode_attributes(hdp.attributes),
                                time_unix_nano=hdp.time_unix_nano,
                                start_time_unix_nano=hdp.start_time_unix_nano,
                                temporality=_temporality(m.histogram.aggregation_temporality),
                                count=hdp.count,
                                sum=hdp.sum if hdp.HasField("sum") else None,
                                bucket_counts=tuple(hdp.bucket_counts),
                                explicit_bounds=tuple(hdp.explicit_bounds),
                                resource=resource,
                            )
                        )
                elif kind in ("exponential_histogram", "summary"):
                    for xdp in getattr(m, kind).data_points:
                        out.append(
                            MetricPoint(
                                **common,
                                attributes=decode_attributes(xdp.attributes),
                                time_unix_nano=xdp.time_unix_nano,
                                start_time_unix_nano=xdp.start_time_unix_nano,
                                count=xdp.count,
                                sum=xdp.sum,
                                resource=resource,
                            )
                        )
    return out


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


# ---------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so no idle keep-alive threads outlive stop().
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0]
        if path not in (TRACES_PATH, METRICS_PATH):
            receiver._error(f"POST to unknown path {self.path!r}")
            self._reply(404, b"not found", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 <= length <= _MAX_BODY:
                raise ValueError(f"bad Content-Length {length}")
            raw = self.rfile.read(length)
            body = _decompress(raw, self.headers.get("Content-Encoding", ""))
            ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/x-protobuf":
                raise ValueError(f"unsupported Content-Type {ctype!r} (want application/x-protobuf)")
            if path == TRACES_PATH:
                treq = ExportTraceServiceRequest()
                treq.ParseFromString(body)
                receiver._add_spans(_decode_spans(treq), self.headers.get("Content-Encoding", ""))
                response = ExportTraceServiceResponse().SerializeToString()
            else:
                mreq = ExportMetricsServiceRequest()
                mreq.ParseFromString(body)
                receiver._add_points(_decode_metrics(mreq), self.headers.get("Content-Encoding", ""))
                response = ExportMetricsServiceResponse().SerializeToString()
        except (ValueError, OSError, DecodeError, EOFError, zlib.error) as e:
            receiver._error(f"{path}: {type(e).__name__}: {e}")
            self._reply(400, str(e).encode(), "text/plain")
            return
        self._reply(200, response, "application/x-protobuf")

    def do_GET(self) -> None:
        self._reply(405, b"OTLP/HTTP receiver: POST only", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OTLPReceiver


class OTLPReceiver:
    """An OTLP/HTTP (protobuf) receiver on ``127.0.0.1``; use as a context manager.

    Point exporters at :attr:`traces_endpoint` and :attr:`metrics_endpoint`. All
    accessors return snapshots and are safe to call while exports arrive.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._lock = threading.Lock()
        self._spans: list[SpanRecord] = []
        self._points: list[MetricPoint] = []
        self._errors: list[str] = []
        #: (signal, Content-Encoding) of every accepted request.
        self._requests: list[tuple[str, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("OTLPReceiver already started")
        server = _Server((self._host, 0), _Handler)  # port 0: the kernel picks a free port
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("OTLPReceiver is not running")
        return int(self._server.server_address[1])

    @property
    def traces_endpoint(self) -> str:
        return f"http://{self._host}:{self.port}{TRACES_PATH}"

    @property
    def metrics_endpoint(self) -> str:
        return f"http://{self._host}:{self.port}{METRICS_PATH}"

    # -- called by the handler threads ------------------------------------------

    def _add_spans(self, spans: list[SpanRecord], encoding: str) -> None:
        with self._lock:
            self._spans.extend(spans)
            self._requests.append(("traces", encoding))

    def _add_points(self, points: list[MetricPoint], encoding: str) -> None:
        with self._lock:
            self._points.extend(points)
            self._requests.append(("metrics", encoding))

    def _error(self, message: str) -> None:
        with self._lock:
            self._errors.append(message)

    # -- accessors (thread-safe snapshots) ----------------------------------------

    def spans(self, name: str | None = None) -> list[SpanRecord]:
        with self._lock:
            spans = list(self._spans)
        return spans if name is None else [s for s in spans if s.name == name]

    def span(self, span_id: str) -> SpanRecord:
        for s in self.spans():
            if s.span_id == span_id:
                return s
        raise KeyError(span_id)

    def trace(self, trace_id: str) -> list[SpanRecord]:
        return [s for s in self.spans() if s.trace_id == trace_id]

    def points(self, name: str | None = None, **attrs: Any) -> list[MetricPoint]:
        """Every point received, oldest first; ``attrs`` filter on point attributes (exact match)."""
        with self._lock:
            points = list(self._points)
        return [
            p
            for p in points
            if (name is None or p.name == name) and all(p.attributes.get(k) == v for k, v in attrs.items())
        ]

    def latest(self, name: str, **attrs: Any) -> list[MetricPoint]:
        """The most recent point of each attribute set of metric ``name`` (cumulative state)."""
        last: dict[tuple[tuple[str, str], ...], MetricPoint] = {}
        for p in self.points(name, **attrs):
            key = tuple(sorted((k, repr(v)) for k, v in p.attributes.items()))
            prev = last.get(key)
            if prev is None or p.time_unix_nano >= prev.time_unix_nano:
                last[key] = p
        return list(last.values())

    def metric_names(self) -> set[str]:
        return {p.name for p in self.points()}

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._points.clear()
            self._errors.clear()
            self._requests.clear()

    def wait_for(self, predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
        """Poll ``predicate`` until it is truthy or ``timeout`` seconds passed; its last verdict."""
        end = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= end:
                return bool(predicate())
            time.sleep(interval)


# ---------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------
#: Attributes shown by :func:`format_trace_tree`, in this order (when present).
KEY_ATTRIBUTES: tuple[str, ...] = (
    "app.phase",
    "db.operation.name",
    "db.operation.batch.size",
    "redis.resilience.outcome",
    "redis.resilience.attempts",
    "redis.resilience.breaker.state",
    "error.type",
    "redis.resilience.operations",
    "redis.resilience.fallbacks",
    "redis.resilience.degraded",
)
# Event attributes too long or too noisy for a one-line summary.
_HIDDEN_EVENT_ATTRIBUTES = frozenset({"exception.stacktrace", "exception.message", "exception.escaped"})


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _fmt_attrs(attrs: Mapping[str, Any], keys: Sequence[str] | None, hidden: frozenset[str]) -> str:
    names = [k for k in keys if k in attrs] if keys is not None else sorted(attrs)
    return " ".join(f"{k}={_fmt_value(attrs[k])}" for k in names if k not in hidden)


def format_trace_tree(
    spans: Iterable[SpanRecord], root_span_id: str, *, keys: Sequence[str] | None = KEY_ATTRIBUTES
) -> str:
    """Render the span ``root_span_id`` and its descendants as an indented tree.

    One line per span (``name [KIND] duration status``), then a ``= `` line of key
    attributes (``keys``; ``None`` shows them all) and a ``* `` line per event with its
    offset from the span's start and its attributes. Children are indented four more
    columns and ordered by start time.
    """
    spans = list(spans)
    by_id = {s.span_id: s for s in spans}
    if root_span_id not in by_id:
        raise KeyError(f"span {root_span_id} not among the {len(spans)} spans given")
    children: dict[str, list[SpanRecord]] = {}
    for s in spans:
        if s.parent_span_id is not None:
            children.setdefault(s.parent_span_id, []).append(s)
    lines: list[str] = []

    def render(span: SpanRecord, depth: int) -> None:
        pad = "    " * depth
        status = "" if span.status == "UNSET" else f" status={span.status}"
        lines.append(f"{pad}{span.name} [{span.kind}] {span.duration_ms:.1f} ms{status}")
        attrs = _fmt_attrs(span.attributes, keys, frozenset())
        if attrs:
            lines.append(f"{pad}  = {attrs}")
        for ev in span.events:
            offset = (ev.time_unix_nano - span.start_time_unix_nano) / 1e6
            ev_attrs = _fmt_attrs(ev.attributes, None, _HIDDEN_EVENT_ATTRIBUTES)
            lines.append(f"{pad}  * @+{offset:.1f} ms {ev.name}" + (f" {ev_attrs}" if ev_attrs else ""))
        for child in sorted(children.get(span.span_id, []), key=lambda c: c.start_time_unix_nano):
            render(child, depth + 1)

    render(by_id[root_span_id], 0)
    return "\n".join(lines)
