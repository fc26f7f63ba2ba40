"""The asyncio cluster driver: performs the steps of the cluster flows by awaiting; the handle.

Every decision is in ``cluster.py`` (the node flow), ``cluster_batch.py`` (cross-slot
work) and ``_decide``; this module only awaits sends, refreshes and sleeps, and
runs the nodes' shares of a batch concurrently. It never blocks the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio.cluster
from redis.asyncio.cluster import PipelineCommand

from .._decide.commands import _NAMES, command_name
from .._handle import make_class
from .._scope import RequestScope, scope_closed_error
from .cluster import ClusterState, MoveSlot, NodeFlow, Refresh, Send, flow_for, node_flow, refresh_flow
from .cluster_batch import Command, Part, part_flow, redirected_positions, split
from .cluster_handle import ClusterHandleBase
from .connection import AsyncConnectionHooks, hooked_class
from .context import CURRENT_ATTEMPT, Attempt
from .flows import Stepper, view_flow

_monotonic = time.monotonic


async def drive(flow: NodeFlow, state: ClusterState) -> Any:
    """Perform the flow's steps until it returns (or raises)."""
    stepper = Stepper(flow)
    while stepper.running:
        step = stepper.step
        reply: Any = None
        if isinstance(step, Send):
            token = CURRENT_ATTEMPT.set(step.attempt)
            try:
                deadline = step.attempt.deadline
                if deadline is None and state.client_timeout:
                    deadline = _monotonic() + state.client_timeout
                if deadline is None:
                    reply = await _send(step)
                else:
                    # The attempt's bound: redis-py's own timeouts read None inside it
                    # (the hooked connection class), so this is the one that holds.
                    async with asyncio.timeout(max(deadline - _monotonic(), 0.0)):
                        reply = await _send(step)
            except BaseException as exc:
                stepper.throw(exc)
                continue
            finally:
                CURRENT_ATTEMPT.reset(token)
        elif isinstance(step, Refresh):
            await refresh(state, step.deadline, step.avoid)
        elif isinstance(step, MoveSlot):
            await state.client.nodes_manager.move_slot(step.error)
        else:
            await asyncio.sleep(step.seconds)
        stepper.send(reply)
    return stepper.value


async def _send(step: Send) -> Any:
    node = step.node
    if step.commands is None and not step.asking:
        return await node.execute_command(*step.args, **step.options)
    if step.commands is not None:
        cmds = [PipelineCommand(i, *a, **o) for i, (a, o) in enumerate(step.commands)]
    else:
        # ASKING and the command on one connection, one after the other.
        cmds = [PipelineCommand(0, "ASKING"), PipelineCommand(1, *step.args, **step.options)]
    await node.execute_pipeline(cmds)
    replies = [c.result for c in cmds]
    if step.commands is not None:
        return replies
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies[1]


async def refresh(state: ClusterState, deadline: float, avoid: str | None) -> None:
    """Drive :func:`refresh_flow`: each step one ``initialize()``, awaited under its timeout."""
    stepper = Stepper(refresh_flow(state, deadline, avoid, _monotonic))
    nm = state.client.nodes_manager
    try:
        while stepper.running:
            token = CURRENT_ATTEMPT.set(Attempt(None))
            try:
                async with asyncio.timeout(stepper.step.timeout):
                    await nm.initialize()
                ok = True
            except Exception:
                ok = False
            finally:
                CURRENT_ATTEMPT.reset(token)
            stepper.send(ok)
    finally:
        stepper.close()  # a cancellation still releases the refresh claim


async def ensure_initialized(state: ClusterState, scope: RequestScope | None) -> None:
    """The client's first discovery (an asyncio cluster client connects on first use), bounded."""
    client = state.client
    deadline = None if scope is None else scope.deadline_at
    if deadline is None:
        await client.initialize()
    else:
        async with asyncio.timeout(max(deadline - _monotonic(), 0.0)):
            await client.initialize()
    state.after_refresh()


def hook_node(state: ClusterState, node: Any) -> None:
    """Give a node the connection hooks (the attempt's bound, "was it sent?")."""
    cls = node.connection_class
    if issubclass(cls, AsyncConnectionHooks):
        return
    checks = bool(node.connection_kwargs.get("health_check_interval"))
    node.connection_class = hooked = hooked_class(cls, is_async=True, health_checks=checks)
    for conn in list(node._connections):
        conn.__class__ = hooked


async def _slot(client: Any, args: Sequence[Any]) -> int | None:
    try:
        slot = await client._determine_slot(*args)
    except Exception:
        return None
    return None if slot is None else int(slot)


async def _run_view(
    handle: Any, name: str, args: Sequence[Any], options: dict[str, Any], run: Callable[[], Any]
) -> Any:
    core = handle._orr_core
    flow = view_flow(core, handle._orr_mode, name, args, options, handle._orr_scope, handle._orr_decodes)
    stepper = Stepper(flow)
    while stepper.running:
        try:
            reply = await run()
        except Exception as exc:
            stepper.throw(exc)
        else:
            stepper.send(reply)
    return stepper.value


class AsyncClusterHandle(ClusterHandleBase, redis.asyncio.cluster.RedisCluster):  # type: ignore[misc]
    """The request-scoped resilient handle for a ``redis.asyncio.cluster.RedisCluster``.

    As the sync one: redis-py's routing is kept, each node's part runs through
    that node's breaker within the request's deadline, MOVED and ASK followed.
    """

    _orr_cluster: ClusterState

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        state = self._orr_cluster
        if state.client._initialize:
            await ensure_initialized(state, self._orr_scope)
        # The handle never re-initialises on its own: refreshes are the flows' (single-flight).
        self._initialize = False
        return await super().execute_command(*args, **kwargs)

    async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        scope = self._orr_scope
        if scope is not None and scope.ended:
            raise scope_closed_error(_NAMES.get(args[0]) or command_name(args))
        state = self._orr_cluster
        slot = await _slot(self, args)
        if not self._orr_mode:
            return await drive(flow_for(state, scope, target_node, args, kwargs, slot), state)
        name = _NAMES.get(args[0]) or command_name(args)
        return await _run_view(
            self,
            name,
            args,
            kwargs,
            lambda: drive(flow_for(state, scope, target_node, args, kwargs, slot), state),
        )

    async def _orr_part(self, state: ClusterState, scope: RequestScope | None, part: Part) -> Any:
        try:
            replies = list(await drive(part_flow(state, scope, part), state))
        except Exception as exc:
            return exc
        for i in redirected_positions(replies):
            args, options = part.commands[i]
            flow = node_flow(
                state, scope, part.node, command_name(args), args, options, await _slot(self, args)
            )
            try:
                replies[i] = await drive(flow, state)
            except Exception as exc:
                replies[i] = exc
        return replies

    async def _orr_batch(self, commands: Sequence[Command], raise_on_error: bool) -> list[Any]:
        """Cross-slot work: each node's share through its breaker, concurrently; replies in order."""
        scope: RequestScope | None = self._orr_scope
        if scope is not None and scope.ended:
            raise scope_closed_error("pipeline execute()")
        state = self._orr_cluster
        if state.client._initialize:
            await ensure_initialized(state, scope)
        parts = split(state, commands, [await _slot(self, args) for args, _ in commands])
        outcomes = await asyncio.gather(*(self._orr_part(state, scope, part) for part in parts))
        return self._orr_combine(commands, parts, outcomes, raise_on_error)

    async def mget_nonatomic(self, keys: Any, *args: Any) -> list[Any]:  # type: ignore[override]
        keys, slots_to_keys, commands = self._orr_mget(keys, args)
        return self._reorder_keys_by_command(keys, slots_to_keys, await self._orr_batch(commands, True))

    async def mset_nonatomic(self, mapping: Mapping[Any, Any]) -> list[bool]:  # type: ignore[override]
        return await self._orr_batch(self._orr_mset(mapping), True)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        return self._orr_pipeline(transaction, shard_hint, AsyncClusterPipelineHooks, _pipeline_classes)

    async def aclose(self) -> None:
        """Does nothing: the handle does not own the client or its nodes."""

    async def close(self) -> None:
        """Does nothing: the handle does not own the client or its nodes."""

    def __del__(self, *args: Any) -> None:
        pass


class AsyncClusterPipelineHooks:
    """Mixed in front of redis-py's asyncio ``ClusterPipeline``: ``execute()`` splits per node."""

    _orr_handle: AsyncClusterHandle
    _execution_strategy: Any

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        queue = self._execution_strategy._command_queue
        commands = [(c.args, dict(c.kwargs)) for c in queue]
        try:
            return await self._orr_handle._orr_batch(commands, raise_on_error) if commands else []
        finally:
            await self.reset()  # type: ignore[attr-defined]


_pipeline_classes: dict[type, type] = {}
_handle_classes: dict[type, type] = {}


def handle_class(client_cls: type) -> type:
    if client_cls is redis.asyncio.cluster.RedisCluster:
        return AsyncClusterHandle
    return make_class(_handle_classes, AsyncClusterHandle, client_cls)
