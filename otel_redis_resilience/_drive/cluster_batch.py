"""Cross-slot work on a cluster: a batch split per node, each part through its node's breaker.

Cluster pipelines, ``mget_nonatomic`` and ``mset_nonatomic`` are batches: the
commands are split by the node that owns each one's slot (:func:`split`), each
node's share runs as one pipeline under that node's breaker (:func:`part_flow`),
a command answered MOVED or ASK is run again on its own (its redirect followed),
and the replies are put back in the caller's order (:func:`combine`). I/O-free:
the sync driver runs the parts one after the other, the asyncio one concurrently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from .._decide.commands import command_name
from .._errors import RedisUnavailable
from .cluster import _REDIRECTS, ClusterState, NodeFlow, node_flow

if TYPE_CHECKING:
    from .._scope import RequestScope

Command: TypeAlias = tuple[Sequence[Any], dict[str, Any]]


@dataclass(slots=True)
class Part:
    """One node's share of a cross-slot batch: the commands' positions and the commands."""

    node: Any
    positions: list[int]
    commands: list[Command]


def split(state: ClusterState, commands: Sequence[Command], slots: Sequence[int | None]) -> list[Part]:
    """The batch split per node by each command's slot (no slot: a random primary)."""
    parts: dict[str, Part] = {}
    for i, (args, options) in enumerate(commands):
        node = state.owner(slots[i])
        if node is None:
            node = state.client.get_random_node()
        part = parts.get(node.name)
        if part is None:
            part = parts[node.name] = Part(node, [], [])
        part.positions.append(i)
        part.commands.append((args, options))
    return list(parts.values())


def part_flow(state: ClusterState, scope: RequestScope | None, part: Part) -> NodeFlow:
    """One node's share of a batch, as one pipeline through that node's breaker."""
    name = "PIPELINE" if len(part.commands) > 1 else command_name(part.commands[0][0])
    return node_flow(state, scope, part.node, name, (), {}, None, commands=part.commands)


def redirected_positions(replies: Sequence[Any]) -> list[int]:
    """Which replies of a node's share are MOVED or ASK (re-run on their own, redirect followed)."""
    return [i for i, r in enumerate(replies) if isinstance(r, _REDIRECTS)]


def combine(
    size: int,
    parts: Sequence[Part],
    outcomes: Sequence[list[Any] | BaseException],
    *,
    raise_on_error: bool,
    recover: Callable[[Command, Exception], Any] | None,
    commands: Sequence[Command],
) -> list[Any]:
    """The batch's replies in the caller's order, from each part's replies or failure.

    A failed part answers through ``recover`` (a degraded view: a miss for each of
    its reads) when it can; otherwise the batch raises one ``RedisUnavailable``
    naming every node that failed (``raise_on_error=False``: it stands in place of
    each of that part's replies instead).
    """
    replies: list[Any] = [None] * size
    failed: list[tuple[Part, BaseException]] = []
    for part, outcome in zip(parts, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            if recover is not None and isinstance(outcome, Exception):
                try:
                    for pos in part.positions:
                        replies[pos] = recover(commands[pos], outcome)
                    continue
                except Exception:
                    pass
            failed.append((part, outcome))
            for pos in part.positions:
                replies[pos] = outcome
            continue
        for pos, reply in zip(part.positions, outcome, strict=True):
            replies[pos] = reply
    if failed and raise_on_error:
        first = failed[0][1]
        if not isinstance(first, RedisUnavailable):
            raise first
        nodes = tuple(p.node.name for p, _ in failed)
        err = RedisUnavailable(
            first.reason,
            operation=first.operation,
            attempts=first.attempts,
            outcome_unknown=any(getattr(e, "outcome_unknown", False) for _, e in failed),
            detail=f"{len(failed)} of {len(parts)} nodes failed",
            error_code=first.error_code,
            nodes=nodes,
        )
        raise err from first
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies
