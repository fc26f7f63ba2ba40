"""Redis Cluster, for real: 3 primaries and 3 replicas on loopback (testbed.RedisClusterBed).

One breaker per primary; a SIGKILLed primary fails only its own keys, fast once its
breaker opens, and its keys succeed again soon after the replica's promotion; with
full coverage the CLUSTERDOWN window opens no healthy breaker; a slot moved under
load is followed (MOVED, ASK) with no error and no breaker opened; an INCR whose
reply is lost is applied at most once. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from otel_redis_resilience import (
    BreakerState,
    BreakerTransitioned,
    ConfigurationError,
    Event,
    RedisUnavailable,
    Resilience,
)
from testbed import RedisServer
from testbed.cluster import RedisClusterBed

DEADLINE = 0.3


@pytest.fixture(scope="module")
def bed() -> Iterator[RedisClusterBed]:
    with RedisClusterBed(require_full_coverage=False) as b:
        yield b


@pytest.fixture
def healthy(bed: RedisClusterBed) -> RedisClusterBed:
    bed.reset_topology()
    return bed


def name(bed: RedisClusterBed, server: RedisServer) -> str:
    return f"{server.host}:{server.port}"


def keys_per_primary(bed: RedisClusterBed, n: int = 4) -> dict[str, list[str]]:
    return {name(bed, p): [bed.key_for_node(p, f"k{i}-") for i in range(n)] for p in bed.primaries()}


# -- the API ----------------------------------------------------------------------------


def test_commands_pipelines_and_cross_slot_sync(healthy: RedisClusterBed) -> None:
    client = healthy.client()
    res = Resilience(client, deadline=1.0)
    assert set(res.breaker_states) == {name(healthy, p) for p in healthy.primaries()}
    assert res.breaker_state is BreakerState.CLOSED
    with res.request() as r:
        assert r.set("a", 1) is True
        assert r.get("a") == b"1"
        assert r.incr("n") == int(client.get("n"))
        assert r.mset_nonatomic({"x": 1, "y": 2, "z": 3}) == [True, True, True]
        assert r.mget_nonatomic(["x", "y", "z", "nope"]) == [b"1", b"2", b"3", None]
        pipe = r.pipeline()
        pipe.set("p1", "v").get("p1").delete("p1")
        assert pipe.execute() == [True, b"v", 1]
        assert r.dbsize() == client.dbsize()
        with pytest.raises(redis.ResponseError):
            r.hget("a", "f")  # WRONGTYPE: the caller's error, unchanged
    assert res.breaker_state is BreakerState.CLOSED


def test_commands_pipelines_and_cross_slot_async(healthy: RedisClusterBed) -> None:
    async def main() -> None:
        client = healthy.async_client()
        res = Resilience(client, deadline=1.0)
        try:
            async with res.request() as r:
                assert await r.set("a", 2) is True
                assert await r.get("a") == b"2"
                assert await r.mset_nonatomic({"x": 1, "y": 2, "z": 3}) == [True, True, True]
                assert await r.mget_nonatomic(["x", "y", "z", "nope"]) == [b"1", b"2", b"3", None]
                pipe = r.pipeline()
                pipe.set("p1", "v").get("p1").delete("p1")
                assert await pipe.execute() == [True, b"v", 1]
            assert set(res.breaker_states) == {name(healthy, p) for p in healthy.primaries()}
        finally:
            await client.aclose()

    asyncio.run(main())


def test_operators_per_node(healthy: RedisClusterBed, clean_redis: RedisServer) -> None:
    res = Resilience(healthy.client(), deadline=0.5)
    keys = keys_per_primary(healthy, 1)
    target, other = sorted(keys)[:2]
    res.force_open(node=target)
    assert res.breaker_states[target] is BreakerState.OPEN
    assert res.breaker_state is BreakerState.OPEN
    with res.request() as r:
        t = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            r.get(keys[target][0])
        assert time.monotonic() - t < 0.05
        assert info.value.reason == "breaker_open"
        assert info.value.node == target
        assert target in str(info.value)
        assert r.get(keys[other][0]) is None  # the other shards are not touched
        # Cross-slot: the forced node's part fails and is named; a miss view answers misses for it only.
        r.set(keys[other][0], "v")
        with pytest.raises(RedisUnavailable) as many:
            r.mget_nonatomic([keys[target][0], keys[other][0]])
        assert many.value.nodes == (target,)
        assert r.miss_on_outage().mget_nonatomic([keys[target][0], keys[other][0]]) == [None, b"v"]
    res.reset(node=target)
    assert res.breaker_state is BreakerState.CLOSED
    with pytest.raises(ConfigurationError):
        res.force_open(node="10.9.9.9:1")
    single = Resilience(redis.Redis(port=clean_redis.port))
    assert (
        single.breaker_states == {f"127.0.0.1:{clean_redis.port}": BreakerState.CLOSED}
        or len(single.breaker_states) == 1
    )
    single.force_open(node=next(iter(single.breaker_states)))
    assert single.breaker_state is BreakerState.OPEN
    single.reset()


def test_redis_py_cluster_retries_are_off(healthy: RedisClusterBed) -> None:
    client = healthy.client()
    Resilience(client)
    assert client.retry.get_retries() == 0


def test_write_behind_on_a_cluster_is_refused_clearly(healthy: RedisClusterBed, tmp_path: Any) -> None:
    from otel_redis_resilience import WriteBehindConfig

    with pytest.raises(ConfigurationError, match="Cluster"):
        Resilience(healthy.client(), write_behind=WriteBehindConfig(str(tmp_path)))


# -- a primary SIGKILLed under load ---------------------------------------------------------


@dataclass
class Call:
    key_node: str
    start: float
    end: float
    ok: bool
    error: BaseException | None = None


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    transitions: list[tuple[float, str, BreakerState]] = field(default_factory=list)

    def hook(self, event: Event) -> None:
        if isinstance(event, BreakerTransitioned):
            self.transitions.append((time.monotonic(), str(event.endpoint), event.new))

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)


def _sync_load(
    res: Resilience,
    keys: dict[str, list[str]],
    load: Load,
    stop: threading.Event,
    deadline: float = DEADLINE,
) -> None:
    flat = [(n, k) for n, ks in keys.items() for k in ks]
    i = 0
    while not stop.is_set():
        node, key = flat[i % len(flat)]
        i += 1
        t = time.monotonic()
        try:
            with res.request(deadline=deadline) as r:
                r.set(key, "v")
                r.get(key)
            load.add(Call(node, t, time.monotonic(), True))
        except redis.RedisError as exc:
            load.add(Call(node, t, time.monotonic(), False, exc))
        time.sleep(0.002)


async def _async_load(res: Resilience, keys: dict[str, list[str]], load: Load, stop: threading.Event) -> None:
    flat = [(n, k) for n, ks in keys.items() for k in ks]
    i = 0
    while not stop.is_set():
        node, key = flat[i % len(flat)]
        i += 1
        t = time.monotonic()
        try:
            async with res.request(deadline=DEADLINE) as r:
                await r.set(key, "v")
                await r.get(key)
            load.add(Call(node, t, time.monotonic(), True))
        except redis.RedisError as exc:
            load.add(Call(node, t, time.monotonic(), False, exc))
        await asyncio.sleep(0.002)


def _report(label: str, load: Load, dead: str, killed: float, promoted: float) -> dict[str, float]:
    others = [c for c in load.calls if c.key_node != dead and c.start >= killed]
    dead_calls = [c for c in load.calls if c.key_node == dead and c.start >= killed]
    opened = [
        t
        for t, node, state in load.transitions
        if node == dead and state is BreakerState.OPEN and t >= killed
    ]
    first_ok = min((c.end for c in dead_calls if c.ok and c.start >= promoted - 0.5), default=float("inf"))
    after_open = [c for c in dead_calls if not c.ok and opened and c.start > opened[0] and c.end < promoted]
    figures = {
        "calls_other_shards": len(others),
        "errors_other_shards": sum(not c.ok for c in others),
        "longest_call_other_shards": max((c.end - c.start for c in others), default=0.0),
        "errors_dead_shard": sum(not c.ok for c in dead_calls),
        "kill_to_breaker_open": (opened[0] - killed) if opened else float("inf"),
        "kill_to_promotion": promoted - killed,
        "promotion_to_first_success": first_ok - promoted,
        "longest_rejected_call": max((c.end - c.start for c in after_open), default=0.0),
        "p90_rejected_call": sorted(c.end - c.start for c in after_open)[int(len(after_open) * 0.9)]
        if after_open
        else 0.0,
    }
    print(
        f"\n[{label}] "
        + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )
    return figures


def _kill_under_load(bed: RedisClusterBed, run_load: Any, label: str) -> dict[str, float]:
    victim = bed.primaries()[0]
    dead = name(bed, victim)
    keys = keys_per_primary(bed)
    load = Load()
    stop = threading.Event()
    with run_load(keys, load, stop):
        time.sleep(0.5)
        killed = time.monotonic()
        bed.kill(victim)
        _, promoted = bed.wait_for_promotion(victim)
        time.sleep(1.5)
        stop.set()
    figures = _report(label, load, dead, killed, promoted)
    assert figures["errors_other_shards"] == 0, [
        c.error for c in load.calls if not c.ok and c.key_node != dead
    ][:3]
    assert figures["calls_other_shards"] > 50
    assert figures["kill_to_breaker_open"] <= 5 * DEADLINE
    # Rejected calls are fast; the slowest is one that ran a refresh against a healthy node
    # that was itself stalled (redis-server rewrites nodes.conf when it marks a node FAIL).
    assert figures["p90_rejected_call"] < 0.02
    assert figures["longest_rejected_call"] <= DEADLINE + 0.05
    assert figures["promotion_to_first_success"] <= 1.0
    return figures


@pytest.mark.slow
def test_sigkill_a_primary_sync_load(healthy: RedisClusterBed) -> None:
    res_holder: list[Resilience] = []

    @contextlib.contextmanager
    def run(keys: dict[str, list[str]], load: Load, stop: threading.Event) -> Iterator[None]:
        res = Resilience(healthy.client(), deadline=DEADLINE, hooks=[load.hook])
        res_holder.append(res)
        threads = [threading.Thread(target=_sync_load, args=(res, keys, load, stop)) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            yield
        finally:
            stop.set()
            for t in threads:
                t.join(5)

    _kill_under_load(healthy, run, "sync, full coverage no")
    res = res_holder[0]
    # The dead primary owns no slot now: its breaker is gone; the new primary's is closed.
    assert len(res.breaker_states) == 3


@pytest.mark.slow
def test_sigkill_a_primary_async_load(healthy: RedisClusterBed) -> None:
    @contextlib.contextmanager
    def run(keys: dict[str, list[str]], load: Load, stop: threading.Event) -> Iterator[None]:
        async def main() -> None:
            client = healthy.async_client()
            res = Resilience(client, deadline=DEADLINE, hooks=[load.hook])
            try:
                await asyncio.gather(*(_async_load(res, keys, load, stop) for _ in range(20)))
            finally:
                await client.aclose()

        thread = threading.Thread(target=asyncio.run, args=(main(),))
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    _kill_under_load(healthy, run, "asyncio, full coverage no")


# -- full coverage: the CLUSTERDOWN window ---------------------------------------------------


@pytest.mark.slow
def test_full_coverage_clusterdown_opens_no_healthy_breaker() -> None:
    with RedisClusterBed(require_full_coverage=True) as full:
        victim = full.primaries()[0]
        dead = name(full, victim)
        keys = {n: ks for n, ks in keys_per_primary(full).items() if n != dead}
        load = Load()
        res = Resilience(full.client(), deadline=DEADLINE, hooks=[load.hook])
        stop = threading.Event()
        threads = [threading.Thread(target=_sync_load, args=(res, keys, load, stop)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        killed = time.monotonic()
        full.kill(victim)
        _, promoted = full.wait_for_promotion(victim)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(5)
        window = [c for c in load.calls if killed <= c.start <= promoted]
        failed = [c for c in window if not c.ok]
        healthy_opened = [(t, n) for t, n, s in load.transitions if n != dead and s is BreakerState.OPEN]
        longest = max(c.end - c.start for c in load.calls)
        print(
            f"\n[sync, full coverage yes] calls in the window={len(window)}, failed={len(failed)}, "
            f"healthy breakers opened={len(healthy_opened)}, longest call={longest:.3f}s, "
            f"errors after promotion+0.5s={sum(not c.ok for c in load.calls if c.start > promoted + 0.5)}"
        )
        assert not healthy_opened
        assert longest <= DEADLINE + 0.1
        assert all(isinstance(c.error, RedisUnavailable) for c in failed)
        assert not [c for c in load.calls if not c.ok and c.start > promoted + 0.5]


# -- resharding under load -------------------------------------------------------------------


@pytest.mark.slow
def test_slot_move_under_load_no_errors_no_breaker_opens(healthy: RedisClusterBed) -> None:
    key = "{moving}k"
    slot = healthy.key_slot(key)
    src = healthy.owner_of_slot(slot)
    dst = next(p for p in healthy.primaries() if p is not src)
    siblings = [f"{{moving}}k{i}" for i in range(300)]
    healthy.client().mset_nonatomic({k: "v" for k in siblings})
    load = Load()
    res = Resilience(healthy.client(), deadline=1.0, hooks=[load.hook])
    stop = threading.Event()
    threads = [
        # A generous deadline: this test is about redirects, and a 2-core machine running six
        # redis-servers and this load can stall one call for a few hundred ms.
        threading.Thread(target=_sync_load, args=(res, {"moving": [key, *siblings[:20]]}, load, stop, 1.0))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        moved = healthy.move_slot(slot, dst, batch=20, pause=0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    errors = [c.error for c in load.calls if not c.ok]
    print(f"\n[slot move] keys moved={moved}, calls={len(load.calls)}, errors={len(errors)}")
    assert moved > 0
    assert not errors, errors[:3]
    assert not [t for t in load.transitions if t[2] is BreakerState.OPEN]
    assert res.breaker_state is BreakerState.CLOSED


# -- a lost reply ----------------------------------------------------------------------------


@pytest.mark.slow
def test_incr_whose_reply_is_lost_is_applied_at_most_once(healthy: RedisClusterBed) -> None:
    key = "{lost}counter"
    client = healthy.client()
    client.set(key, 0)
    primary = healthy.primary_for_key(key)
    assert client.execute_command("WAIT", 1, 1000, target_nodes=client.get_node_from_key(key)) == 1
    res = Resilience(client, deadline=0.5)
    with res.request() as r:
        assert r.get(key) == b"0"  # a pooled connection: the INCR itself is sent, not a handshake
    healthy.pause(primary)  # a hung node: the INCR is sent and no reply comes back
    t = time.monotonic()
    try:
        with res.request() as r, pytest.raises(RedisUnavailable) as info:
            r.incr(key)
        took = time.monotonic() - t
        healthy.wait_for_promotion(primary)
    finally:
        healthy.resume(primary)
    err = info.value
    print(f"\n[lost INCR] raised {err.reason} outcome_unknown={err.outcome_unknown} after {took:.3f}s")
    assert info.value.outcome_unknown
    assert info.value.reason in {"unsafe_to_retry", "deadline_exceeded"}
    assert took <= 0.5 + 0.1
    # The INCR reached at most the old primary; it was never re-sent to the new one.
    healthy.wait_healthy()
    deadline = time.monotonic() + 5
    value = None
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError), res.request(deadline=1.0) as r:
            value = int(r.get(key))
            break
        time.sleep(0.1)
    assert value in (0, 1)
