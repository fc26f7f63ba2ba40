"""The sync cluster driver: performs the steps of the cluster flows by blocking I/O; the handle.

Every decision is in ``cluster.py`` (the node flow), ``cluster_batch.py`` (cross-slot
work) and ``_decide``; this module only sends, refreshes, patches a slot and sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._decide.commands import _NAMES, command_name
from .._handle import make_class
from .._scope import RequestScope, scope_closed_error
from .cluster import ClusterState, MoveSlot, NodeFlow, Refresh, Send, flow_for, node_flow, refresh_flow
from .cluster_batch import Command, part_flow, redirected_positions, split
from .cluster_handle import ClusterHandleBase
from .connection import SyncConnectionHooks, hooked_class
from .context import CURRENT_ATTEMPT, Attempt
from .flows import Stepper, view_flow

_monotonic = time.monotonic


def drive(flow: NodeFlow, state: ClusterState) -> Any:
    """Perform the flow's steps until it returns (or raises)."""
    stepper = Stepper(flow)
    while stepper.running:
        step = stepper.step
        reply: Any = None
        if isinstance(step, Send):
            token = CURRENT_ATTEMPT.set(step.attempt)
            try:
                reply = _send(state, step)
            except BaseException as exc:
                stepper.throw(exc)
                continue
            finally:
                CURRENT_ATTEMPT.reset(token)
        elif isinstance(step, Refresh):
            refresh(state, step.deadline, step.avoid)
        elif isinstance(step, MoveSlot):
            state.client.nodes_manager.move_slot(step.error)
        else:
            time.sleep(step.seconds)
        stepper.send(reply)
    return stepper.value


def _send(state: ClusterState, step: Send) -> Any:
    node = step.node
    r = node.redis_connection or state.client.get_redis_connection(node)
    if step.commands is not None:
        pipe = r.pipeline(transaction=False)
        for args, options in step.commands:
            pipe.execute_command(*args, **options)
        return pipe.execute(raise_on_error=False)
    if step.asking:
        # ASKING and the command on one connection, one after the other.
        pipe = r.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.execute_command(*step.args, **step.options)
        return pipe.execute()[1]
    reply = r.execute_command(*step.args, **step.options)
    callback = state.client.cluster_response_callbacks.get(step.args[0])
    return reply if callback is None else callback(reply, **step.options)


def refresh(state: ClusterState, deadline: float, avoid: str | None) -> None:
    """Drive :func:`refresh_flow`: each step one ``initialize()``, its sockets capped by the step's time."""
    stepper = Stepper(refresh_flow(state, deadline, avoid, _monotonic))
    nm = state.client.nodes_manager
    try:
        while stepper.running:
            token = CURRENT_ATTEMPT.set(Attempt(_monotonic() + stepper.step.timeout))
            try:
                nm.initialize(disconnect_startup_nodes_pools=False)
                ok = True
            except Exception:
                ok = False
            finally:
                CURRENT_ATTEMPT.reset(token)
            stepper.send(ok)
    finally:
        stepper.close()


def hook_node(state: ClusterState, node: Any) -> None:
    """Give a node's pool the connection hooks (deadline-capped sockets, "was it sent?")."""
    r = node.redis_connection or state.client.get_redis_connection(node)
    pool = r.connection_pool
    if issubclass(pool.connection_class, SyncConnectionHooks):
        return
    checks = bool(pool.connection_kwargs.get("health_check_interval"))
    pool.connection_class = hooked_class(pool.connection_class, is_async=False, health_checks=checks)
    pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
    # Connections made before (redis-py's discovery) have neither hook: close them.
    pool.disconnect()
    pool.reset()


def _slot(client: Any, args: Sequence[Any]) -> int | None:
    """The slot of a command's keys, or None (keyless, or keys in several slots)."""
    try:
        slot = client.determine_slot(*args)
    except Exception:
        return None
    return None if slot is None else int(slot)


def _run_view(
    handle: Any, name: str, args: Sequence[Any], options: dict[str, Any], run: Callable[[], Any]
) -> Any:
    core = handle._orr_core
    flow = view_flow(core, handle._orr_mode, name, args, options, handle._orr_scope, handle._orr_decodes)
    stepper = Stepper(flow)
    while stepper.running:
        try:
            reply = run()
        except Exception as exc:
            stepper.throw(exc)
        else:
            stepper.send(reply)
    return stepper.value


class SyncClusterHandle(ClusterHandleBase, redis.cluster.RedisCluster):
    """The request-scoped resilient handle for a ``redis.cluster.RedisCluster``.

    redis-py's routing is kept (the key's slot, commands for all primaries, the
    merging of their replies); each node's part runs through that node's breaker
    within the request's deadline, MOVED and ASK followed.
    """

    _orr_cluster: ClusterState

    def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        scope = self._orr_scope
        if scope is not None and scope.ended:
            raise scope_closed_error(_NAMES.get(args[0]) or command_name(args))
        state = self._orr_cluster
        slot = _slot(self, args)
        if not self._orr_mode:
            return drive(flow_for(state, scope, target_node, args, kwargs, slot), state)
        name = _NAMES.get(args[0]) or command_name(args)
        return _run_view(
            self,
            name,
            args,
            kwargs,
            lambda: drive(flow_for(state, scope, target_node, args, kwargs, slot), state),
        )

    def _orr_batch(self, commands: Sequence[Command], raise_on_error: bool) -> list[Any]:
        """Cross-slot work: each node's share through its breaker, replies in order."""
        scope: RequestScope | None = self._orr_scope
        if scope is not None and scope.ended:
            raise scope_closed_error("pipeline execute()")
        state = self._orr_cluster
        parts = split(state, commands, [_slot(self, args) for args, _ in commands])
        outcomes: list[list[Any] | BaseException] = []
        for part in parts:
            try:
                replies = list(drive(part_flow(state, scope, part), state))
            except Exception as exc:
                outcomes.append(exc)
                continue
            for i in redirected_positions(replies):
                args, options = part.commands[i]
                flow = node_flow(
                    state, scope, part.node, command_name(args), args, options, _slot(self, args)
                )
                try:
                    replies[i] = drive(flow, state)
                except Exception as exc:
                    replies[i] = exc
            outcomes.append(replies)
        return self._orr_combine(commands, parts, outcomes, raise_on_error)

    def mget_nonatomic(self, keys: Any, *args: Any) -> list[Any]:
        keys, slots_to_keys, commands = self._orr_mget(keys, args)
        return self._reorder_keys_by_command(keys, slots_to_keys, self._orr_batch(commands, True))

    def mset_nonatomic(self, mapping: Mapping[Any, Any]) -> list[bool]:
        return self._orr_batch(self._orr_mset(mapping), True)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        return self._orr_pipeline(transaction, shard_hint, SyncClusterPipelineHooks, _pipeline_classes)

    def close(self) -> None:
        """Does nothing: the handle does not own the client or its nodes."""

    def __del__(self) -> None:
        pass


class SyncClusterPipelineHooks:
    """Mixed in front of redis-py's ``ClusterPipeline``: ``execute()`` splits the commands per node."""

    _orr_handle: SyncClusterHandle
    _execution_strategy: Any

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        queue = self._execution_strategy.command_queue
        commands = [(c.args, dict(c.options)) for c in queue]
        try:
            return self._orr_handle._orr_batch(commands, raise_on_error) if commands else []
        finally:
            self.reset()  # type: ignore[attr-defined]


_pipeline_classes: dict[type, type] = {}
_handle_classes: dict[type, type] = {}


def handle_class(client_cls: type) -> type:
    if client_cls is redis.cluster.RedisCluster:
        return SyncClusterHandle
    return make_class(_handle_classes, SyncClusterHandle, client_cls)
