"""Redis Cluster telemetry: redirects followed and topology refreshes. Emitted only from here.

Both are counted by node (``server.address``, ``server.port``: the node that sent
the redirect, or the one a refresh asked), so the series stay bounded by the
number of nodes. The per-node breaker state and its transitions need nothing
new: each node has its own ``Telemetry`` (``_drive/cluster.py``), whose server
attributes are that node's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .telemetry import _log_telemetry_failure

if TYPE_CHECKING:
    from .._decide.operation import Operation
    from .telemetry import Telemetry


def redirected(
    telemetry: Telemetry, op: Operation, kind: Literal["moved", "ask"], host: str, port: int
) -> None:
    """``telemetry``'s node answered MOVED or ASK; ``op`` continues on ``host:port``.

    The span event names the new node, and the span's ``server.address`` and
    ``server.port`` become that node's: they name the node that answered last.
    """
    try:
        observed = op.observed
        if observed is not None and observed[0].is_recording():
            span = observed[0]
            span.add_event(
                "redis.resilience.redirect",
                {"redis.resilience.redirect.kind": kind, "server.address": host, "server.port": port},
            )
            span.set_attributes({"server.address": host, "server.port": port})
        telemetry.instruments.cluster_redirects.add(1, {"kind": kind, **telemetry.server_attrs})
    except Exception:
        _log_telemetry_failure()


def refreshed(telemetry: Telemetry, ok: bool) -> None:
    """A topology refresh asked ``telemetry``'s node for the slot table (``ok``: it answered)."""
    try:
        telemetry.instruments.cluster_refreshes.add(
            1, {"outcome": "ok" if ok else "failed", **telemetry.server_attrs}
        )
    except Exception:
        _log_telemetry_failure()
