"""The cluster test bed itself: real redis-server processes joined by redis-cli, real faults.

Figures are printed (``pytest -s``): cluster start time, kill -> promotion, pause ->
promotion, and the CLUSTERDOWN window with ``cluster-require-full-coverage yes``.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from testbed import RedisClusterBed, RedisServer
from testbed.cluster import parse_cluster_nodes


def _direct(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, socket_timeout=1.0, socket_connect_timeout=1.0)


class _Poller:
    """GETs ``key`` straight on ``server`` every few ms in a thread, recording errors with times."""

    def __init__(self, server: RedisServer, key: str) -> None:
        self._client = _direct(server)
        self._key = key
        self.calls = 0
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.get(self._key)
            except redis.RedisError as e:
                self.errors.append((time.monotonic(), type(e).__name__))
            self.calls += 1
            time.sleep(0.002)


def test_parse_cluster_nodes_skips_migration_markers() -> None:
    text = (
        "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-2 5 [6->-b2]\n"
        "b2 127.0.0.1:7001@17001 slave a1 0 1 1 connected\n"
        "c3 127.0.0.1:7002@17002 master,fail - 0 1 2 disconnected\n"
    )
    a, b, c = parse_cluster_nodes(text)
    assert (a.port, a.slots, a.is_primary, a.failed) == (7000, frozenset({0, 1, 2, 5}), True, False)
    assert a.open_slots == frozenset({6})
    assert (b.master_id, b.is_primary) == ("a1", False)
    assert c.failed
    assert c.link == "disconnected"
    assert not c.slots


def test_cluster_comes_up_healthy_with_a_replica_per_primary(cluster: RedisClusterBed) -> None:
    bed = cluster
    print(f"\ncluster start (6 processes, redis-cli create, healthy): {bed.start_seconds:.2f}s")
    assert bed.start_seconds is not None
    assert bed.start_seconds < 15
    assert len(bed.nodes) == 6
    assert len(bed.startup_nodes) == 6
    assert bed.startup_nodes == [(s.host, s.port) for s in bed.nodes]
    assert len({bed.node_id(s) for s in bed.nodes}) == 6
    primaries = bed.primaries()
    assert primaries == bed.nodes[:3] == bed.initial_primaries
    for i, p in enumerate(primaries):
        assert bed.replicas_of(p) == [bed.nodes[3 + i]]
        assert _direct(bed.nodes[3 + i]).execute_command("ROLE")[0] == b"slave"
    owned = [n.slots for n in bed.cluster_nodes() if n.is_primary]
    assert sum(len(s) for s in owned) == 16384
    bed.wait_healthy(timeout=1.0)


def test_primary_for_key_owns_the_key(cluster: RedisClusterBed) -> None:
    bed = cluster
    c = bed.client()
    keys = [f"owner:{i}" for i in range(60)]
    for k in keys:
        c.set(k, k)
    seen = set()
    for k in keys:
        owner = bed.primary_for_key(k)
        seen.add(owner.port)
        assert _direct(owner).get(k) == k.encode()
        other = next(p for p in bed.primaries() if p is not owner)
        with pytest.raises(redis.exceptions.MovedError):
            _direct(other).get(k)
    assert seen == {p.port for p in bed.primaries()}  # the keys spread over every shard
    assert bed.primary_for_key(bed.key_for_node(bed.nodes[1])) is bed.nodes[1]


@pytest.mark.slow
def test_sigkill_primary_promotes_its_replica_healthy_shards_see_no_errors(cluster: RedisClusterBed) -> None:
    bed = cluster
    victim, healthy = bed.nodes[0], bed.nodes[1]
    key = bed.key_for_node(victim)
    c = bed.client()
    c.set(key, "v")
    bed.wait_healthy()  # replicated before the crash
    with _Poller(healthy, bed.key_for_node(healthy)) as poll:
        t_kill = time.monotonic()
        bed.kill(victim)
        promoted, t_promoted = bed.wait_for_promotion(victim)
        time.sleep(0.2)
    took = t_promoted - t_kill
    print(
        f"\nSIGKILL -> promotion: {took:.2f}s (node timeout 1 s); healthy shard: {poll.calls} GETs, 0 errors"
    )
    assert promoted is bed.nodes[3]
    assert 0.5 < took < 10
    assert poll.errors == []  # require_full_coverage=False: the other shards are unaffected
    assert poll.calls > 50
    assert promoted in bed.primaries()
    assert victim not in bed.primaries()
    assert bed.primary_for_key(key) is promoted
    assert _direct(promoted).get(key) == b"v"


@pytest.mark.slow
def test_reset_topology_restores_the_initial_primaries(cluster: RedisClusterBed) -> None:
    bed = cluster
    c = bed.client()
    keys = {bed.key_for_node(p, prefix=f"r{i}-"): str(i) for i, p in enumerate(bed.nodes[:3])}
    for k, v in keys.items():
        c.set(k, v)
    bed.wait_healthy()
    # One primary at a time: a failover needs a majority of the primaries alive.
    bed.kill(bed.nodes[0])
    bed.kill(bed.nodes[4])  # a replica too
    bed.wait_for_promotion(bed.nodes[0])
    bed.pause(bed.nodes[2])
    bed.wait_for_promotion(bed.nodes[2])
    assert bed.nodes[0] not in bed.primaries()
    t0 = time.monotonic()
    bed.reset_topology()
    print(f"\nreset_topology after 2 failovers and a dead replica: {time.monotonic() - t0:.2f}s")
    assert bed.primaries() == bed.nodes[:3]
    for i, p in enumerate(bed.nodes[:3]):
        assert bed.replicas_of(p) == [bed.nodes[3 + i]]
    assert all(s.running and not s.paused for s in bed.nodes)
    for k, v in keys.items():  # failback is graceful: no write lost
        assert bed.primary_for_key(k) in bed.nodes[:3]
        assert _direct(bed.primary_for_key(k)).get(k) == v.encode()
    t0 = time.monotonic()
    bed.reset_topology()  # nothing to do: cheap
    assert time.monotonic() - t0 < 2.0


@pytest.mark.slow
def test_reset_during_a_failover_in_flight_and_a_late_wait_for_promotion(cluster: RedisClusterBed) -> None:
    bed = cluster
    bed.kill(bed.nodes[1])
    bed.reset_topology()  # the replica may win its election while the reset runs
    assert bed.primaries() == bed.nodes[:3]
    bed.kill(bed.nodes[2])
    deadline = time.monotonic() + 15
    while _direct(bed.nodes[5]).execute_command("ROLE")[0] != b"master":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.monotonic()
    promoted, _ = bed.wait_for_promotion(bed.nodes[2])  # after the fact: returns at once
    assert promoted is bed.nodes[5]
    assert time.monotonic() - t0 < 0.5


def test_interrupted_slot_move_is_made_stable_by_reset(cluster: RedisClusterBed) -> None:
    bed = cluster
    slot = bed.key_slot("half-moved")
    src = bed.primary_for_key("half-moved")
    dst = next(p for p in bed.primaries() if p is not src)
    _direct(dst).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", bed.node_id(src))
    _direct(src).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", bed.node_id(dst))
    assert slot in bed._myself(src).open_slots
    bed.reset_topology()
    assert all(not bed._myself(s).open_slots for s in bed.nodes)
    assert bed.primary_for_key("half-moved") is src


def test_restart_keeps_port_and_node_id_and_rejoins(cluster: RedisClusterBed) -> None:
    bed = cluster
    replica = bed.nodes[5]
    port, node_id, pid = replica.port, bed.node_id(replica), replica.pid
    bed.kill(replica)
    bed.restart(replica)
    assert replica.port == port
    assert replica.pid != pid
    assert bed._myself(replica) is not None
    assert bed._myself(replica).node_id == node_id  # nodes.conf kept
    bed.wait_healthy()
    assert bed.replicas_of(bed.nodes[2]) == [replica]


def test_move_slot_with_keys_under_load_plain_client_keeps_reading(cluster: RedisClusterBed) -> None:
    bed = cluster
    c = bed.client()
    keys = [f"{{mv}}:{i}" for i in range(50)]  # one slot
    for k in keys:
        c.set(k, k)
    slot = bed.key_slot(keys[0])
    src = bed.primary_for_key(keys[0])
    dst = next(p for p in bed.primaries() if p is not src)
    errors: list[Exception] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        r = bed.client()
        i = 0
        while not stop.is_set():
            k = keys[i % len(keys)]
            try:
                assert r.get(k) == k.encode()
            except Exception as e:  # any failure counts
                errors.append(e)
            reads += 1
            i += 7

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        time.sleep(0.05)
        asking_before = dst.command_count("asking")
        moved = bed.move_slot(slot, dst, batch=5, pause=0.03)  # slot held open ~0.3 s: ASK
        time.sleep(0.1)
    finally:
        stop.set()
        t.join(5)
    assert moved == 50
    assert errors == []
    assert reads > 50
    assert bed.primary_for_key(keys[0]) is dst
    assert dst.command_count("asking") > asking_before  # the client was sent ASK mid-move
    assert all(_direct(dst).get(k) == k.encode() for k in keys)
    assert c.get(keys[3]) == keys[3].encode()  # a client created before the move follows MOVED


@pytest.mark.slow
def test_pause_primary_promotes_replica_and_resume_demotes_it(cluster: RedisClusterBed) -> None:
    bed = cluster
    victim = bed.nodes[1]
    t0 = time.monotonic()
    bed.pause(victim)
    assert victim.paused
    promoted, t_promoted = bed.wait_for_promotion(victim)
    print(f"\nSIGSTOP -> promotion: {t_promoted - t0:.2f}s")
    assert promoted is bed.nodes[4]
    bed.resume(victim)
    assert not victim.paused
    deadline = time.monotonic() + 10
    while _direct(victim).execute_command("ROLE")[0] != b"slave":  # came back as a replica
        assert time.monotonic() < deadline
        time.sleep(0.01)
    bed.wait_healthy()
    assert bed.replicas_of(promoted) == [victim]


@pytest.mark.slow
def test_full_coverage_clusterdown_on_healthy_shard_while_a_primary_is_failed(
    cluster_full: RedisClusterBed,
) -> None:
    bed = cluster_full
    victim, healthy = bed.nodes[2], bed.nodes[0]
    with _Poller(healthy, bed.key_for_node(healthy)) as poll:
        time.sleep(0.05)
        t_kill = time.monotonic()
        bed.kill(victim)
        _, t_promoted = bed.wait_for_promotion(victim)
        time.sleep(1.0)
    down = [t for t, kind in poll.errors if kind == "ClusterDownError"]
    assert len(down) == len(poll.errors), poll.errors[:3]  # nothing but CLUSTERDOWN
    assert down, "no CLUSTERDOWN on the healthy shard"
    first, last = down[0] - t_kill, down[-1] - t_kill
    print(
        f"\nfull coverage: kill -> promotion {t_promoted - t_kill:.2f}s; healthy shard CLUSTERDOWN from "
        f"+{first:.2f}s to +{last:.2f}s (window {last - first:.2f}s, {len(down)} of {poll.calls} GETs)"
    )
    assert down[0] < t_promoted  # opens before the promotion (at FAIL) ...
    assert down[-1] < t_promoted + 0.5  # ... and closes with it


async def test_async_client(cluster: RedisClusterBed) -> None:
    c = cluster.async_client()
    try:
        await c.set("async:k", "v")
        assert await c.get("async:k") == b"v"
    finally:
        await c.aclose()
    assert _direct(cluster.primary_for_key("async:k")).get("async:k") == b"v"


def test_stop_leaves_no_process_and_no_replicas_variant() -> None:
    with RedisClusterBed(primaries=3, replicas_per_primary=0) as bed:
        pids = [s.pid for s in bed.nodes]
        assert len(bed.primaries()) == 3
        assert all(bed.replicas_of(p) == [] for p in bed.primaries())
        bed.client().set("x", "1")
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
