"""A real Redis Cluster on loopback for the tests, the benchmarks and the demo.

:class:`RedisClusterBed` starts ``primaries * (1 + replicas_per_primary)`` genuine
``redis-server`` processes (each a :class:`~testbed.RedisServer` with ``--cluster-enabled
yes``, in its own directory, with its own ``nodes-<port>.conf``), joins them with
``redis-cli --cluster create ... --cluster-replicas N --cluster-yes`` and waits until
every node reports ``cluster_state:ok``.  Then it crashes, freezes, thaws and restarts
nodes, waits for a replica's promotion, reshards a slot live, and puts the cluster back
as it was between tests (:meth:`RedisClusterBed.reset_topology`).

Nodes are configured so that failovers always happen and are quick:
``cluster-replica-validity-factor 0`` (a replica is always eligible, however long its
link has been down), ``cluster-allow-replica-migration no`` (a replica never moves to
another primary behind the test's back) and a short ``cluster-node-timeout``.

Topology questions (:meth:`~RedisClusterBed.primaries`,
:meth:`~RedisClusterBed.primary_for_key`, ...) are answered from ``CLUSTER NODES`` as seen
by a live node *now*, never from what the bed believes it did.  Node order is pinned:
``bed.nodes[:primaries]`` are the initial primaries, and replica ``k`` (``bed.nodes[primaries
+ k]``) follows initial primary ``k % primaries`` (redis-cli picks its own pairing; the
bed re-pins it with ``CLUSTER REPLICATE`` when it differs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from testbed.redis_server import RedisServer, RedisServerError, find_free_port, pdeathsig_prefix

__all__ = ["ClusterNodeInfo", "RedisClusterBed", "redis_cli_binary"]

_CLI_FALLBACK = "/usr/bin/redis-cli"
_CLI_INSTALL_HINT = "install it with: apt-get install redis-tools"
_SLOTS = 16384
# Admin connections: a short timeout so a question to a dying node never hangs the test.
_ADMIN_TIMEOUT = 1.0
_POLL = 0.01


def redis_cli_binary() -> str:
    """Path of ``redis-cli`` (PATH, then Debian's ``/usr/bin/redis-cli``), or :class:`RedisServerError`."""
    found = shutil.which("redis-cli")
    if found:
        return found
    if os.access(_CLI_FALLBACK, os.X_OK):
        return _CLI_FALLBACK
    raise RedisServerError(f"redis-cli not found on PATH or at {_CLI_FALLBACK}; {_CLI_INSTALL_HINT}")


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # the primary a replica follows; None for a primary
    link: str  # "connected" / "disconnected"
    slots: frozenset[int]  # slots this node serves (importing/migrating markers left out)
    open_slots: frozenset[int] = frozenset()  # slots this node is importing or migrating

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        """Flagged ``fail`` or ``fail?`` (pfail) by the node that answered."""
        return "fail" in self.flags or "fail?" in self.flags


def parse_cluster_nodes(text: str) -> list[ClusterNodeInfo]:
    """Parse the text reply of ``CLUSTER NODES``."""
    out: list[ClusterNodeInfo] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, addr, flags, master = parts[0], parts[1], parts[2], parts[3]
        hostport = addr.split("@", 1)[0]
        host, _, port = hostport.rpartition(":")
        slots: set[int] = set()
        open_slots: set[int] = set()
        for item in parts[8:]:
            if item.startswith("["):  # [slot->-id] migrating / [slot-<-id] importing
                open_slots.add(int(item[1:].split("-", 1)[0]))
                continue
            lo, _, hi = item.partition("-")
            slots.update(range(int(lo), int(hi or lo) + 1))
        out.append(
            ClusterNodeInfo(
                node_id=node_id,
                host=host,
                port=int(port) if port else 0,
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                link=parts[7],
                slots=frozenset(slots),
                open_slots=frozenset(open_slots),
            )
        )
    return out


class RedisClusterBed:
    """A real Redis Cluster of ``primaries`` shards, each with ``replicas_per_primary`` replicas.

    Usable as a context manager (start on enter, stop every process on exit); never leaks a
    process (each node is a :class:`RedisServer`: atexit plus the parent-death signal).

    ``node_timeout_ms`` is ``cluster-node-timeout`` (how long until a silent node is
    marked FAIL and its replica may take over).  ``require_full_coverage`` is
    ``cluster-require-full-coverage``: with ``True`` (Redis's default) every node answers
    CLUSTERDOWN for every slot between a primary's FAIL and its replica's promotion.
    ``extra_args`` go to every node's ``redis-server`` command line, last.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        require_full_coverage: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must be >= 0")
        self.primaries_count = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.require_full_coverage = require_full_coverage
        self._extra_args = list(extra_args)
        self._cli = redis_cli_binary()
        self.nodes: list[RedisServer] = []
        self._ids: dict[int, str] = {}  # port -> node id (stable across restarts: nodes.conf)
        self._admin: dict[int, redis.Redis[Any]] = {}
        self._admin_lock = threading.Lock()
        self._clients: list[redis.cluster.RedisCluster] = []
        self._initial_slots: dict[int, str] = {}  # slot -> node id of its initial owner
        # primary id -> ports that were last seen following it (for a late wait_for_promotion)
        self._followers: dict[str, set[int]] = {}
        self._started = False
        #: Seconds the last :meth:`start` took (processes up, joined, healthy).
        self.start_seconds: float | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node, join them with redis-cli and wait until the cluster is healthy."""
        if self._started:
            raise RedisServerError("cluster already started")
        t0 = time.monotonic()
        self._started = True
        try:
            self._launch_nodes()
            self._create_cluster(timeout)
            self._learn_ids()
            self._pin_replicas(timeout)
            self.wait_healthy(timeout)
            self._initial_slots = {slot: n.node_id for n in self._topology() for slot in n.slots}
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Close the bed's clients and stop every node (idempotent)."""
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        with self._admin_lock:
            admins, self._admin = list(self._admin.values()), {}
        for a in admins:
            with contextlib.suppress(Exception):
                a.close()
        for s in self.nodes:
            with contextlib.suppress(Exception):
                s.stop()
        self._started = False

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
        return f"<RedisClusterBed {self.primaries_count}x(1+{self.replicas_per_primary}) ports={self.ports}>"

    def _node_args(self, port: int, bus_port: int) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-port", str(bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "yes" if self.require_full_coverage else "no",
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-replica-migration", "no",
            "--appendonly", "no",
            "--save", "",
            # A (re)joining replica syncs at once instead of after Redis's 5 s default delay.
            "--repl-diskless-sync-delay", "0",
            *self._extra_args,
        ]  # fmt: skip

    def _new_node(self) -> RedisServer:
        # Explicit ports (the data port and the cluster bus port): the config file name
        # carries the port, and a fixed port makes RedisServer retry the same one.
        port = find_free_port(self.host)
        bus = find_free_port(self.host)
        while bus == port:
            bus = find_free_port(self.host)
        return RedisServer(port=port, extra_args=self._node_args(port, bus))

    def _launch_nodes(self) -> None:
        total = self.primaries_count * (1 + self.replicas_per_primary)
        self.nodes = [self._new_node() for _ in range(total)]
        for s in self.nodes:
            s.start(wait=False)
        deadline = time.monotonic() + 10.0
        pending = list(range(total))
        while pending:
            still = []
            for i in pending:
                try:
                    if not self.nodes[i].ready():
                        still.append(i)
                except RedisServerError:
                    # Port taken between picking and binding: a fresh node on new ports.
                    self.nodes[i].stop()
                    self.nodes[i] = self._new_node()
                    self.nodes[i].start()
            pending = still
            if pending and time.monotonic() > deadline:
                raise RedisServerError(f"cluster nodes did not start: {[self.nodes[i] for i in pending]}")
            if pending:
                time.sleep(0.005)

    def _create_cluster(self, timeout: float) -> None:
        cmd = [
            *pdeathsig_prefix("KILL"),
            self._cli,
            "--cluster", "create",
            *[f"{self.host}:{s.port}" for s in self.nodes],
            "--cluster-replicas", str(self.replicas_per_primary),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise RedisServerError(f"redis-cli --cluster create timed out after {timeout}s") from e
        if r.returncode != 0 or "[ERR]" in r.stdout:
            raise RedisServerError(
                f"redis-cli --cluster create failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
            )

    def _learn_ids(self) -> None:
        for s in self.nodes:
            self._ids[s.port] = str(self._admin_for(s).execute_command("CLUSTER", "MYID"))

    def _pin_replicas(self, timeout: float) -> None:
        """Make replica k follow initial primary k % P (redis-cli chose its own pairing)."""
        p = self.primaries_count
        deadline = time.monotonic() + timeout
        for k, replica in enumerate(self.nodes[p:]):
            want = self._ids[self.nodes[k % p].port]
            while True:
                me = self._myself(replica)
                if me is not None and me.master_id is not None:
                    break  # redis-cli's CLUSTER REPLICATE has taken effect
                if time.monotonic() > deadline:
                    raise RedisServerError(f"{replica} never became a replica")
                time.sleep(_POLL)
            if me.master_id != want:
                self._replicate(replica, want, deadline)

    def _replicate(self, replica: RedisServer, master_id: str, deadline: float) -> None:
        # The replica must know the master first; it does (one cluster), but a freshly
        # restarted node may still be gossiping, so retry until the deadline.
        while True:
            try:
                self._admin_for(replica).execute_command("CLUSTER", "REPLICATE", master_id)
                return
            except redis.ResponseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- addresses ------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, initial primaries first."""
        return [(s.host, s.port) for s in self.nodes]

    @property
    def initial_primaries(self) -> list[RedisServer]:
        """The nodes that were primaries when the cluster was created (and after :meth:`reset_topology`)."""
        return self.nodes[: self.primaries_count]

    def node_id(self, server: RedisServer) -> str:
        """The cluster node id of ``server`` (kept across restarts by its nodes.conf)."""
        return self._ids[server.port]

    def server_for(self, node: str | int | tuple[str, int]) -> RedisServer:
        """The node with this node id, port, ``"host:port"`` or ``(host, port)``."""
        if isinstance(node, tuple):
            node = node[1]
        if isinstance(node, str):
            if ":" in node:
                node = int(node.rpartition(":")[2])
            else:
                for s in self.nodes:
                    if self._ids.get(s.port) == node:
                        return s
                raise KeyError(node)
        for s in self.nodes:
            if s.port == node:
                return s
        raise KeyError(node)

    def address(self, server: RedisServer) -> str:
        """``"host:port"``, the form the library keys its breakers by."""
        return f"{server.host}:{server.port}"

    # -- topology, read from the cluster now --------------------------------------------

    def _admin_for(self, server: RedisServer) -> redis.Redis[Any]:
        with self._admin_lock:
            c = self._admin.get(server.port)
            if c is None:
                c = redis.Redis(
                    host=server.host,
                    port=server.port,
                    socket_timeout=_ADMIN_TIMEOUT,
                    socket_connect_timeout=_ADMIN_TIMEOUT,
                    decode_responses=True,
                    retry=Retry(NoBackoff(), 0),
                )
                self._admin[server.port] = c
            return c

    def live_nodes(self) -> list[RedisServer]:
        """Nodes whose process runs and is not paused."""
        return [s for s in self.nodes if s.running and not s.paused]

    def cluster_nodes(self, server: RedisServer | None = None) -> list[ClusterNodeInfo]:
        """``CLUSTER NODES`` as seen by ``server`` (default: the first live node that answers)."""
        if server is not None:
            return self._remember(
                parse_cluster_nodes(self._admin_for(server).execute_command("CLUSTER", "NODES"))
            )
        return self._topology()

    def _remember(self, infos: list[ClusterNodeInfo]) -> list[ClusterNodeInfo]:
        with self._admin_lock:
            for n in infos:
                if n.master_id is not None and n.port:
                    self._followers.setdefault(n.master_id, set()).add(n.port)
        return infos

    def _topology(self) -> list[ClusterNodeInfo]:
        last: Exception | None = None
        for s in self.live_nodes():
            try:
                return self._remember(
                    parse_cluster_nodes(self._admin_for(s).execute_command("CLUSTER", "NODES"))
                )
            except redis.RedisError as e:
                last = e
        raise RedisServerError(f"no cluster node answers CLUSTER NODES (last error: {last!r})")

    def _myself(self, server: RedisServer) -> ClusterNodeInfo | None:
        try:
            infos = self.cluster_nodes(server)
        except redis.RedisError:
            return None
        return next((n for n in infos if "myself" in n.flags), None)

    def _servers(self, infos: Iterable[ClusterNodeInfo]) -> list[RedisServer]:
        by_id = {self._ids.get(s.port): s for s in self.nodes}
        return [by_id[n.node_id] for n in infos if n.node_id in by_id]

    def primaries(self) -> list[RedisServer]:
        """Nodes that are primaries now: ``master``, serving slots, not flagged failed.

        A killed primary whose replica has not been promoted yet is left out (it is
        ``master,fail`` or ``master,fail?``), so during that window the list is short.
        """
        infos = [n for n in self._topology() if n.is_primary and n.slots and not n.failed]
        return sorted(self._servers(infos), key=self.nodes.index)

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        """Nodes that follow ``primary`` now (failed ones included)."""
        pid = self.node_id(primary)
        return sorted(self._servers(n for n in self._topology() if n.master_id == pid), key=self.nodes.index)

    def owner_of_slot(self, slot: int) -> RedisServer:
        """The node serving ``slot`` now (as the first live node sees it)."""
        for n in self._topology():
            if slot in n.slots:
                return self._servers([n])[0]
        raise RedisServerError(f"slot {slot} is not served by any node")

    @staticmethod
    def key_slot(key: str | bytes) -> int:
        """The hash slot of ``key`` (hash tags honoured)."""
        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def primary_for_key(self, key: str | bytes) -> RedisServer:
        """The node owning ``key``'s slot now."""
        return self.owner_of_slot(self.key_slot(key))

    def key_for_node(self, server: RedisServer, prefix: str = "k") -> str:
        """A key (``prefix`` + a number) whose slot ``server`` serves now."""
        owned = {s for n in self._topology() if n.node_id == self.node_id(server) for s in n.slots}
        if not owned:
            raise RedisServerError(f"{server} serves no slot")
        for i in range(100_000):
            key = f"{prefix}{i}"
            if self.key_slot(key) in owned:
                return key
        raise RedisServerError("no key found")  # pragma: no cover

    # -- faults ---------------------------------------------------------------------

    def kill(self, server: RedisServer) -> None:
        """SIGKILL the node (its dir and nodes.conf are kept for :meth:`restart`)."""
        server.kill()

    def pause(self, server: RedisServer) -> None:
        """SIGSTOP the node: connections hang, nothing is answered, its peers time it out."""
        server.pause()

    def resume(self, server: RedisServer) -> None:
        """SIGCONT a paused node."""
        server.resume()

    def restart(self, server: RedisServer, *, wait: bool = True) -> None:
        """Bring the node back on its port with its nodes.conf, so it rejoins (a killed or
        demoted primary comes back as a replica of whoever took its slots).  A running
        node is stopped gracefully first."""
        if server.paused:
            server.resume()
        if server.running:
            server.restart(wait=wait)
        else:
            server.start(wait=wait)

    # -- waiting --------------------------------------------------------------------

    def _role(self, server: RedisServer) -> str | None:
        try:
            role = self._admin_for(server).execute_command("ROLE")
        except redis.RedisError:
            return None
        return str(role[0])

    def wait_for_promotion(
        self, old_primary: RedisServer, timeout: float = 15.0
    ) -> tuple[RedisServer, float]:
        """Wait until a replica of ``old_primary`` is promoted.

        Polls each candidate's ``ROLE`` every 10 ms and returns ``(replica,
        time.monotonic())`` from the first poll that saw it as a primary.  The candidates
        are the nodes that follow ``old_primary`` in the live nodes' view of the cluster,
        plus those the bed last saw following it (so a call made after the promotion still
        finds it, and returns at once: the time is then when it was first *seen*).
        """
        pid = self.node_id(old_primary)
        with self._admin_lock:
            known = set(self._followers.get(pid, ()))
        candidates: list[RedisServer] = [s for s in self.nodes if s.port in known and s is not old_primary]
        for s in self.live_nodes():
            if s is old_primary:
                continue
            with contextlib.suppress(redis.RedisError):
                for n in self.cluster_nodes(s):
                    srv = self._servers([n])
                    if n.master_id == pid and srv and srv[0] not in candidates:
                        candidates.append(srv[0])
        if not candidates:
            raise RedisServerError(f"{old_primary} has no replica to promote")
        deadline = time.monotonic() + timeout
        while True:
            for c in candidates:
                if c.running and not c.paused and self._role(c) == "master":
                    return c, time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica of {old_primary} promoted within {timeout}s: {candidates}")
            time.sleep(_POLL)

    def _health_problems(self) -> list[str]:
        problems: list[str] = []
        live = self.live_nodes()
        live_ids = {self._ids[s.port] for s in live}
        views: dict[int, frozenset[tuple[str, bool, str | None, frozenset[int]]]] = {}
        for s in live:
            a = self._admin_for(s)
            try:
                info = a.execute_command("CLUSTER", "INFO")
                nodes = parse_cluster_nodes(a.execute_command("CLUSTER", "NODES"))
            except redis.RedisError as e:
                problems.append(f"{s.port}: {e!r}")
                continue
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            if fields.get("cluster_state") != "ok":
                problems.append(f"{s.port}: cluster_state {fields.get('cluster_state')}")
            if fields.get("cluster_slots_ok") != str(_SLOTS):
                problems.append(f"{s.port}: cluster_slots_ok {fields.get('cluster_slots_ok')}")
            for n in nodes:
                if n.node_id in live_ids and n.failed:
                    problems.append(f"{s.port} sees {n.port} as {','.join(sorted(n.flags))}")
            views[s.port] = frozenset((n.node_id, n.is_primary, n.master_id, n.slots) for n in nodes)
            me = next((n for n in nodes if "myself" in n.flags), None)
            is_replica = me is not None and me.master_id is not None and me.master_id in live_ids
            if is_replica and not self._link_up(s):
                problems.append(f"{s.port}: replica link to its primary not up")
        if len(set(views.values())) > 1:
            problems.append("live nodes disagree about slot owners or who follows whom")
        return problems

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Wait until every live node says ``cluster_state:ok`` with all 16384 slots ok, no
        live node is flagged failed by another, all agree on the slot owners and on who
        follows whom, and every live replica of a live primary has its replication link up."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self._health_problems()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not healthy within {timeout}s: {problems[:8]}")
            time.sleep(_POLL)

    # -- putting it back --------------------------------------------------------------

    def reset_topology(self, timeout: float = 30.0) -> None:
        """Bring every node back and the initial layout with it, for reuse between tests.

        Paused nodes are resumed, dead ones restarted (they rejoin from nodes.conf), each
        initial primary that is a replica now takes over again with ``CLUSTER FAILOVER``
        (``FORCE`` if the graceful one stalls), every replica is re-pinned to its initial
        primary, a slot left importing/migrating is made stable, slots moved by
        :meth:`move_slot` go back to their initial owner, and the
        cluster is healthy on return.  Data is kept; see :meth:`flushall`.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._reset_once(deadline)
            wrong = self._layout_problems()
            if not wrong:
                return
            # A failover still in flight (a primary killed just before the reset) can undo
            # a step after it was taken: go round again.
            if time.monotonic() > deadline:
                raise TimeoutError(f"reset_topology: layout not restored within {timeout}s: {wrong}")

    def _layout_problems(self) -> list[str]:
        p = self.primaries_count
        problems = []
        if self.primaries() != self.nodes[:p]:
            problems.append(f"primaries are {self.primaries()}")
        for k, replica in enumerate(self.nodes[p:]):
            me = self._myself(replica)
            if me is None or me.master_id != self._ids[self.nodes[k % p].port]:
                problems.append(f"{replica} does not follow {self.nodes[k % p]}")
        return problems

    def _reset_once(self, deadline: float) -> None:
        for s in self.nodes:
            if s.paused:
                s.resume()
        for s in self.nodes:
            if not s.running:
                s.start()
        self._wait_joined(deadline)
        for s in self.nodes:  # a move_slot that was interrupted: close the slot again
            me = self._myself(s)
            for slot in me.open_slots if me is not None else ():
                with contextlib.suppress(redis.RedisError):
                    self._admin_for(s).execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        p = self.primaries_count
        for prim in self.nodes[:p]:
            self._fail_back(prim, deadline)
        for k, replica in enumerate(self.nodes[p:]):
            want = self._ids[self.nodes[k % p].port]
            me = self._myself(replica)
            if me is None or me.master_id != want:
                self._replicate(replica, want, deadline)
        self.wait_healthy(max(0.1, deadline - time.monotonic()))
        if self._initial_slots:
            owners = {slot: n.node_id for n in self._topology() for slot in n.slots}
            for slot, initial in self._initial_slots.items():
                if owners.get(slot) != initial:
                    self.move_slot(slot, self.server_for(initial))
            self.wait_healthy(max(0.1, deadline - time.monotonic()))

    def _wait_joined(self, deadline: float) -> None:
        """Every node sees every other as reachable (no fail/pfail), and every node that was
        demoted knows whom it follows."""
        while True:
            ok = True
            for s in self.nodes:
                try:
                    infos = self.cluster_nodes(s)
                except redis.RedisError:
                    ok = False
                    break
                if any(n.failed for n in infos) or len(infos) != len(self.nodes):
                    ok = False
                    break
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("restarted nodes did not rejoin the cluster")
            time.sleep(_POLL)

    def _fail_back(self, prim: RedisServer, deadline: float) -> None:
        force = False
        while True:
            me = self._myself(prim)
            if me is not None and me.is_primary:
                return
            if me is not None and me.master_id is not None and self._link_up(prim):
                # Graceful first: the replica waits for the primary's offset, so no write is lost.
                with contextlib.suppress(redis.ResponseError):
                    args = ("CLUSTER", "FAILOVER", "FORCE") if force else ("CLUSTER", "FAILOVER")
                    self._admin_for(prim).execute_command(*args)
                step_deadline = min(deadline, time.monotonic() + 3.0)
                while time.monotonic() < step_deadline:
                    if self._role(prim) == "master":
                        return
                    time.sleep(_POLL)
                force = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{prim} did not become a primary again")
            time.sleep(_POLL)

    def _link_up(self, replica: RedisServer) -> bool:
        try:
            return self._admin_for(replica).info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def flushall(self) -> None:
        """FLUSHALL on every primary (replicas follow)."""
        for s in self.primaries():
            self._admin_for(s).flushall()

    # -- resharding -----------------------------------------------------------------

    def move_slot(self, slot: int, to_server: RedisServer, *, batch: int = 100, pause: float = 0.0) -> int:
        """Reshard one slot live, the way ``redis-cli --cluster reshard`` does.

        ``CLUSTER SETSLOT IMPORTING`` on the target, ``MIGRATING`` on the source, then
        ``MIGRATE`` of its keys ``batch`` at a time (``pause`` seconds between batches, to
        hold the slot open so clients see ASK), then ``SETSLOT NODE`` on the target, the
        source and every other primary.  Returns the number of keys moved; waits until
        every live node agrees on the new owner.
        """
        src = self.owner_of_slot(slot)
        if src is to_server:
            return 0
        dst_id, src_id = self.node_id(to_server), self.node_id(src)
        d, s = self._admin_for(to_server), self._admin_for(src)
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while True:
            keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            s.execute_command(
                "MIGRATE", to_server.host, to_server.port, "", 0, 5000, "REPLACE", "KEYS", *keys
            )
            moved += len(keys)
            if pause:
                time.sleep(pause)
        d.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for p in self.primaries():
            if p is not to_server and p is not src:
                with contextlib.suppress(redis.RedisError):
                    self._admin_for(p).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        deadline = time.monotonic() + 10.0
        while True:
            views = []
            for n in self.live_nodes():
                with contextlib.suppress(redis.RedisError):
                    views.append(any(i.node_id == dst_id and slot in i.slots for i in self.cluster_nodes(n)))
            if views and all(views):
                return moved
            if time.monotonic() > deadline:
                raise TimeoutError(f"slot {slot} move to {to_server} not seen by every node")
            time.sleep(_POLL)

    # -- clients --------------------------------------------------------------------

    def _startup(self) -> list[RedisServer]:
        # Live nodes first: redis-py tries startup nodes in order, and a paused one holds
        # it for its socket timeout.
        return sorted(self.nodes, key=lambda s: (not (s.running and not s.paused), self.nodes.index(s)))

    def client(self, **kw: Any) -> redis.cluster.RedisCluster:
        """A plain ``redis.cluster.RedisCluster`` on the startup nodes (redis-py's defaults
        unless overridden); closed by :meth:`stop`."""
        nodes = [redis.cluster.ClusterNode(s.host, s.port) for s in self._startup()]
        c = redis.cluster.RedisCluster(startup_nodes=nodes, **kw)
        self._clients.append(c)
        return c

    def async_client(self, **kw: Any) -> redis.asyncio.cluster.RedisCluster:
        """A plain ``redis.asyncio.cluster.RedisCluster`` on the startup nodes; connects on
        first use; the caller closes it (``await c.aclose()``)."""
        nodes = [redis.asyncio.cluster.ClusterNode(s.host, s.port) for s in self._startup()]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **kw)
