"""What ``Resilience`` does for a Redis Cluster client: per-node state, hooks, probes, handles.

Chosen once, at construction (``Resilience`` asks :func:`cluster_kind`). The
per-node decisions are in ``_decide/topology.py``, the flows in
``_drive/cluster.py``; this module wires them to a client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._decide.breaker import BreakerState
from ._decide.config import BreakerPolicy, RetryPolicy
from ._decide.topology import worst
from ._drive import cluster_aio, cluster_sync
from ._drive.cluster import ClusterState
from ._drive.connection import hooked_class
from ._drive.flows import probe_flow
from ._errors import ConfigurationError
from ._observe.events import Endpoint
from ._observe.telemetry import Telemetry


def cluster_kind(client: object) -> str | None:
    """``"sync"`` or ``"async"`` for a cluster client, None for anything else."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        return "async"
    if isinstance(client, redis.cluster.RedisCluster):
        return "sync"
    return None


def cluster_endpoint(client: Any) -> Endpoint:
    """The first startup node: the cluster's own address in telemetry (fallbacks, refreshes)."""
    nodes = list(client.nodes_manager.startup_nodes.values())
    node = nodes[0]
    return Endpoint(str(node.host), int(node.port), 0)


class Cluster:
    """One cluster ``Resilience``'s per-node state, and what it does to the client."""

    def __init__(
        self,
        client: Any,
        *,
        is_async: bool,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        telemetry: Telemetry,
        make_telemetry: Callable[[Endpoint], Telemetry],
        driver: Any,
        alive: Callable[[], int],
    ) -> None:
        self.client = client
        self.is_async = is_async
        self._driver = driver
        #: The owner's generation (bumped by close()): a probe started before it stops.
        self._alive = alive
        self.state = ClusterState(
            client,
            retry=retry,
            breaker=breaker,
            telemetry=telemetry,
            make_telemetry=make_telemetry,
            start_probe=self._start_probe,
            hook_node=cluster_aio.hook_node if is_async else cluster_sync.hook_node,
        )
        self.handle_class = (cluster_aio.handle_class if is_async else cluster_sync.handle_class)(
            type(client)
        )
        # redis-py's asyncio cluster client keeps its state in __slots__, not in __dict__.
        self._slots = tuple(
            name
            for klass in type(client).__mro__
            for name in vars(klass).get("__slots__", ())
            if not name.startswith("__") and hasattr(client, name)
        )

    def fill(self, handle: Any) -> None:
        """Give a new handle the client's state (the handle is the client, seen through one scope)."""
        client = self.client
        for name in self._slots:
            setattr(handle, name, getattr(client, name))
        handle._orr_cluster = self.state

    def install(self) -> None:
        """redis-py's cluster retries off (``max_attempts`` is the one retry layer); hooks on every node."""
        client = self.client
        client.set_retry(Retry(NoBackoff(), 0))
        nm = client.nodes_manager
        kwargs = nm.connection_kwargs
        timeout = kwargs.get("socket_timeout")
        if timeout:
            self.state.client_timeout = float(timeout)
            if self.state.attempt_timeout is None:
                self.state.attempt_timeout = float(timeout)
        if self.is_async:
            # Nodes found later are made from these kwargs: hooked from the start.
            cls = kwargs.get("connection_class") or redis.asyncio.connection.Connection
            checks = bool(kwargs.get("health_check_interval"))
            kwargs["connection_class"] = hooked_class(cls, is_async=True, health_checks=checks)
            for node in [*nm.startup_nodes.values(), *nm.nodes_cache.values()]:
                self.state.hook_node(node)
        else:
            for node in list(nm.nodes_cache.values()):
                self.state.hook_node(node)
        self.state.after_refresh()

    # -- operators ----------------------------------------------------------------

    def states(self) -> dict[str, BreakerState]:
        return self.state.states()

    def worst(self) -> BreakerState:
        return worst(self.states().values())

    def cores(self, node: str | None) -> list[Any]:
        if node is None:
            return list(self.state.registry.snapshot().values())
        core = self.state.registry.find(node)
        if core is None:
            known = ", ".join(sorted(self.state.registry.snapshot())) or "none yet"
            raise ConfigurationError(f"no breaker for node {node!r} (known: {known})")
        return [core]

    # -- probes -------------------------------------------------------------------

    def _start_probe(self, name: str) -> None:
        state = self.state
        core = state.registry.find(name)
        if core is None:
            return
        node = state.client.nodes_manager.get_node(node_name=name)
        generation = self._alive()
        # Stops when close() runs, or when the node loses its breaker (it owns no slot now).
        flow = probe_flow(
            core,
            core.breaker_policy,
            lambda: generation == self._alive() and state.registry.find(name) is core,
        )
        target = None if node is None else (node if self.is_async else node.redis_connection)
        if target is None or not self._driver.start_probe(flow, target, core.endpoint):
            flow.close()
            core.probe_finished()
