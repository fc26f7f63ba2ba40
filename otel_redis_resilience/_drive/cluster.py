"""Redis Cluster: the per-node state, and the node flows written once for sync and asyncio.

A cluster ``Resilience`` has one :class:`Core` per primary node (a breaker, a
telemetry naming the node), all sharing one lock and one retry budget (the
budget is process-wide, as on a single endpoint). :class:`ClusterState` holds
them with the topology rules of ``_decide/topology.py``.

The handles override redis-py's per-node step (``RedisCluster._execute_command``)
and keep the rest of its routing (slot, multi-node fan-out, reply merging).
Each per-node step is :func:`node_flow`: an I/O-free generator, stepped by the
sync driver (``cluster_sync.py``) or the asyncio one (``cluster_aio.py``), like
the view flows of ``flows.py``. It yields :class:`Send` (one attempt on one node,
under an :class:`Attempt` bound), :class:`Refresh` (the topology, bounded by the
caller's deadline), :class:`MoveSlot` (patch one slot after MOVED) and
:class:`Sleep`, and decides everything else: redirects, retries (the
``Operation`` rules, unchanged: a write that may have run on the old primary is
re-sent to the new one only when its reply is stable), when to refresh, and
which node an attempt goes to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import redis.exceptions as rexc

from .._decide.budget import RetryBudget
from .._decide.commands import _NAMES, command_name
from .._decide.config import BreakerPolicy, RetryPolicy
from .._decide.errors import ErrorKind
from .._decide.operation import RERAISE, GiveUp, Operation
from .._decide.topology import MAX_REDIRECTS, REFRESH_TIMEOUT, NodeRegistry, RefreshGate, redirected, retarget
from .._errors import RedisUnavailable
from .._observe.cluster import redirected as redirected_event
from .._observe.cluster import refreshed
from .._observe.events import Endpoint
from .classify import classify, error_code
from .context import Attempt
from .core import Core, unavailable

if TYPE_CHECKING:
    from .._observe.telemetry import Telemetry
    from .._scope import RequestScope

_monotonic = time.monotonic
_REDIRECTS = (rexc.MovedError, rexc.AskError)
#: Failures after which the slot table may be stale (the node died, or was demoted).
_STALE_AFTER = frozenset({ErrorKind.CONNECTION, ErrorKind.TIMEOUT, ErrorKind.TRANSIENT})


@dataclass(slots=True)
class Send:
    """Step: one attempt on ``node`` (``commands``: a plain pipeline of them), ASKING first if ``asking``."""

    node: Any
    attempt: Attempt
    args: Sequence[Any]
    options: dict[str, Any]
    commands: Sequence[tuple[Sequence[Any], dict[str, Any]]] | None
    asking: bool


@dataclass(frozen=True, slots=True)
class Refresh:
    """Step: refresh the topology by ``deadline`` (a monotonic time), asking ``avoid`` last."""

    deadline: float
    avoid: str | None


@dataclass(frozen=True, slots=True)
class MoveSlot:
    """Step: patch the slot table from a MOVED reply (redis-py's ``move_slot``)."""

    error: Exception


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step: TypeAlias = Send | Refresh | MoveSlot | Sleep
NodeFlow: TypeAlias = Generator[Step, Any, Any]


class ClusterState:
    """Everything one cluster ``Resilience`` shares: per-node cores, the refresh gate, the client."""

    def __init__(
        self,
        client: Any,
        *,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        telemetry: Telemetry,
        make_telemetry: Callable[[Endpoint], Telemetry],
        start_probe: Callable[[str], None],
        hook_node: Callable[[ClusterState, Any], None],
    ) -> None:
        self.client = client
        #: The cluster's own telemetry (fallbacks, refreshes): the first startup node's address.
        self.telemetry = telemetry
        self.retry = retry
        self.breaker_policy = breaker
        self._make_telemetry = make_telemetry
        self._start_probe = start_probe
        #: Installs the connection hooks on a node (its pool or its connection class).
        self._hook_node = hook_node
        self.lock = threading.Lock()
        self.budget = RetryBudget.of(retry)
        self.registry: NodeRegistry[Core] = NodeRegistry(self._make_core, self.lock)
        self.gate = RefreshGate(self.lock)
        #: The client's socket_timeout, which bounds an attempt without attempt_timeout.
        self.attempt_timeout = retry.attempt_timeout
        self.client_timeout: float | None = None

    def _make_core(self, name: str) -> Core:
        host, _, port = name.rpartition(":")
        endpoint = Endpoint(host, int(port), 0)
        telemetry = self._make_telemetry(endpoint)
        core = Core(
            endpoint=endpoint,
            retry=self.retry,
            breaker=self.breaker_policy,
            telemetry=telemetry,
            start_probe=lambda: self._start_probe(name),
        )
        # One lock and one budget for all nodes: the budget is process-wide.
        core.lock = self.lock
        core.budget = self.budget
        core.attempt_timeout = self.attempt_timeout
        core.client_timeout = self.client_timeout
        telemetry.watch_state(core.state)
        return core

    def hook_node(self, node: Any) -> None:
        self._hook_node(self, node)

    # -- topology ------------------------------------------------------------------

    def core_for(self, node: Any) -> Core:
        core = self.registry.find(node.name)
        if core is None:
            self.hook_node(node)
            core = self.registry.get(node.name)
        return core

    def owners(self) -> set[str]:
        """The names of the nodes that own a slot now (first of each slot's list)."""
        cache = self.client.nodes_manager.slots_cache
        return {nodes[0].name for nodes in list(cache.values()) if nodes}

    def after_refresh(self) -> None:
        """The slot table changed: new primaries get a closed breaker, former ones lose theirs."""
        nm = self.client.nodes_manager
        for node in list(nm.nodes_cache.values()):
            self.hook_node(node)
        self.registry.sync(self.owners())

    def refresh_candidates(self, avoid: str | None) -> list[Any]:
        """Nodes to ask for the slot table: healthy primaries first, the failing node last."""
        nm = self.client.nodes_manager
        nodes = list(nm.nodes_cache.values()) or list(nm.startup_nodes.values())

        def rank(node: Any) -> tuple[int, int]:
            core = self.registry.find(node.name)
            unhealthy = core is not None and core.breaker.state.value != "closed"
            return (node.name == avoid or unhealthy, node.server_type != "primary")

        return sorted(nodes, key=rank)[:3]

    def owner(self, slot: int | None) -> Any:
        """The primary that owns ``slot`` now (None: no slot, or not covered)."""
        if slot is None:
            return None
        try:
            return self.client.nodes_manager.get_node_from_slot(slot)
        except rexc.SlotNotCoveredError:
            return None

    def node_named(self, host: str, port: int) -> Any:
        nm = self.client.nodes_manager
        node = nm.get_node(host=host, port=port)
        return node

    def states(self) -> dict[str, Any]:
        return {name: core.breaker.state for name, core in sorted(self.registry.snapshot().items())}

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.gate.after_fork(self.lock)
        self.registry = NodeRegistry(self._make_core, self.lock)


def node_flow(
    state: ClusterState,
    scope: RequestScope | None,
    node: Any,
    name: str,
    args: Sequence[Any],
    options: dict[str, Any],
    slot: int | None,
    *,
    commands: Sequence[tuple[Sequence[Any], dict[str, Any]]] | None = None,
) -> NodeFlow:
    """One command (or one node's share of a pipeline) on the cluster; returns its reply.

    ``slot``: the node was chosen by this slot, so after a failure or a refresh
    the attempt goes to whichever node owns the slot then (None: the caller or
    redis-py named the node, and it stays).
    """
    reroute = slot is not None
    core = state.core_for(node)
    pipeline = None if commands is None else [(tuple(a), o) for a, o in commands]
    op = Operation(core, scope, name, args, pipeline=pipeline)
    timeout = op.start(_monotonic())
    asking = False
    redirects = 0
    last: BaseException | None = None
    while True:
        if isinstance(timeout, GiveUp):
            if timeout.reason == "breaker_open" and reroute:
                # This node's breaker is open: the slot may have a new owner already
                # (a failover). Refresh if nobody did lately, then try the owner once.
                moved_to = yield from _refreshed_owner(state, op, node, slot)
                if moved_to is not None:
                    node = moved_to
                    retarget(op, state.core_for(node))
                    timeout = op.next_attempt(_monotonic())
                    continue
            raise _unavailable(op, timeout, last, node)
        attempt = Attempt(None if timeout is None else _monotonic() + timeout)
        try:
            reply = yield Send(node, attempt, op.args, options, commands, asking)
        except _REDIRECTS as exc:
            redirects += 1
            asking = isinstance(exc, rexc.AskError)
            if not asking:
                yield MoveSlot(exc)
            target = state.node_named(exc.host, exc.port)
            if target is None or redirects > MAX_REDIRECTS:
                # Redirected in circles (a slot migrating back and forth): a transient
                # state like TRYAGAIN, retried after a backoff within the deadline.
                delay = op.failed(ErrorKind.TRANSIENT, error_code(exc), exc, False, _monotonic())
                if isinstance(delay, GiveUp):
                    raise _unavailable(op, delay, exc, node) from exc
                if delay > 0:
                    yield Sleep(delay)
                asking, redirects, last = False, 0, exc
                timeout = op.next_attempt(_monotonic())
                continue
            redirected_event(
                state.core_for(node).telemetry,
                op,
                "ask" if asking else "moved",
                target.host,
                int(target.port),
            )
            node = target
            timeout = redirected(op, state.core_for(node), _monotonic())
            last = exc
            continue
        except BaseException as exc:
            kind = classify(exc)
            now = _monotonic()
            delay = op.failed(kind, error_code(exc), exc, attempt.sent, now)
            if delay == RERAISE:
                raise
            stale = kind in _STALE_AFTER
            if isinstance(delay, GiveUp):
                if stale and state.gate.claim(now):
                    # Nothing to wait for in this call; the next one routes by the fresh table.
                    yield Refresh(min(now + REFRESH_TIMEOUT, op.deadline_at or float("inf")), node.name)
                raise _unavailable(op, delay, exc, node) from exc
            if delay > 0:
                yield Sleep(delay)
            if stale:
                if state.gate.claim(_monotonic()):
                    yield Refresh(_refresh_deadline(op), node.name)
                owner = state.owner(slot) if reroute else None
                if owner is not None and owner.name != node.name:
                    node = owner
                    retarget(op, state.core_for(node))
            asking = False
            last = exc
            timeout = op.next_attempt(_monotonic())
            continue
        op.succeeded(_monotonic())
        return reply


def _refresh_deadline(op: Operation) -> float:
    bound = _monotonic() + REFRESH_TIMEOUT
    deadline = op.deadline_at
    return bound if deadline is None else min(bound, deadline)


def _refreshed_owner(state: ClusterState, op: Operation, node: Any, slot: int | None) -> NodeFlow:
    """After a rejection: the slot's new owner if a refresh (or another caller's) found one."""
    owner = state.owner(slot)
    if owner is None or owner.name == node.name:
        if not state.gate.claim(_monotonic()):
            return None
        yield Refresh(_refresh_deadline(op), node.name)
        owner = state.owner(slot)
    if owner is None or owner.name == node.name:
        return None
    core = state.core_for(owner)
    if core.breaker.state.value == "open":
        return None
    return owner


def _unavailable(op: Operation, verdict: GiveUp, cause: BaseException | None, node: Any) -> RedisUnavailable:
    return unavailable(op, verdict, cause, node=node.name)


def flow_for(
    state: ClusterState,
    scope: RequestScope | None,
    node: Any,
    args: Sequence[Any],
    options: dict[str, Any],
    slot: int | None,
) -> NodeFlow:
    """The flow of one command redis-py routed to ``node`` (``slot``: its keys' slot, or None)."""
    name = _NAMES.get(args[0]) or command_name(args)
    # A keyed command follows its slot; a node-targeted one (keyless, all-shards) stays.
    owner = state.owner(slot)
    if owner is None or owner.name != node.name:
        slot = None
    return node_flow(state, scope, node, name, args, options, slot)


@dataclass(frozen=True, slots=True)
class Initialize:
    """Step of :func:`refresh_flow`: re-read the slot table from the client's startup nodes
    (set to one node), within ``timeout`` seconds; answered True when it worked."""

    timeout: float


def refresh_flow(state: ClusterState, deadline: float, avoid: str | None, now: Callable[[], float]) -> Any:
    """Re-read the slot table from one node (healthy ones first), by ``deadline``; never raises.

    Written once: the drivers answer :class:`Initialize` steps (blocking or awaiting).
    The caller holds the refresh claim (single-flight); it is released here.
    """
    nm = state.client.nodes_manager
    ok = False
    try:
        for node in state.refresh_candidates(avoid):
            left = deadline - now()
            if left < 0.002:
                break
            saved = nm.startup_nodes
            try:
                state.hook_node(node)
                # Asked alone: redis-py asks its startup nodes in a random order, and a
                # hung one would hold the refresh. With dynamic startup nodes (the
                # default) initialize() sets them to every node it found. Each node asked
                # gets part of the time: a hung one must not use it all.
                nm.startup_nodes = {node.name: node}
                ok = yield Initialize(min(left, REFRESH_TIMEOUT / 2))
            except Exception:
                ok = False
            if not ok or not nm._dynamic_startup_nodes:
                nm.startup_nodes = saved
            refreshed(state.telemetry, ok)
            if ok:
                break
        if ok:
            state.after_refresh()
    finally:
        state.gate.finished(ok)
