"""What a caller sees during a Redis outage: the library's defaults against plain redis-py.

What is measured
    Two faults, each on its own fresh ``redis-server`` (started here, no persistence):

    * ``blackhole``: the client reaches Redis through the tests' fault-injecting TCP proxy
      (``testbed.FaultProxy``). On the fault the proxy stops forwarding: it still accepts
      connections and reads whatever is sent, discards it and never replies (like a
      dropped route or a frozen host). When it is switched back, the connections that
      lived through the blackhole are reset (their requests and replies are out of step)
      and new ones forward again.
    * ``kill``: ``SIGKILL`` to redis-server; restore = start it again on the same port.

    For each, a sync ``Resilience(redis.Redis(host, port))`` with the library's
    DEFAULT policies (after 20 successful warm-up calls) calls
    ``with res.request(deadline=1.0) as h: h.get(key)`` in a loop, sleeping 10 ms
    between calls. The first 10 calls after the fault are timed (wall clock, ms) with
    their outcome and the breaker state after the call. The fault is held for a few
    seconds, then restored, and the loop goes on until the first successful call: the
    "restore -> first success" time is measured from the moment the proxy forwards
    again / the restarted server answers PING, to the end of that call.

    The anchor: plain ``redis.Redis(host, port)`` with redis-py's own defaults
    (redis-py 8.1: socket_timeout 5 s, 10 retries with backoff), warmed up the same way,
    then ONE call after the same fault, run in a thread and given up on after 70 s
    (printed as ">70 s"). ``--skip-anchor`` skips it; ``--quick`` caps it at 3 s.

How to read the output
    One table per fault for the library (call #, ms, outcome, breaker state), the
    breaker transitions seen by a hook (ms since the fault), a summary table of the
    restore times, and the anchor table. A fail-fast library should show a few calls
    bounded by the 1 s deadline, then sub-millisecond ``breaker_open`` rejections, and
    a recovery within about one probe interval (0.5 s) of the restore.

Run: ``python bench/outage_timeline.py`` (about 1.5 minutes, mostly the blackhole
anchor), ``--skip-anchor`` (about 15 s) or ``--quick`` (< 20 s).
"""

from __future__ import annotations

# First: outside the project's virtualenv, _harness exits with a clear message.
from _harness import HOST, FaultProxy, RedisServer, table

# isort: split
import argparse
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from otel_redis_resilience import BreakerTransitioned, Event, RedisUnavailable, Resilience

KEY = "bench:key"
CALL_GAP = 0.010
DEADLINE = 1.0


# -- faults -----------------------------------------------------------------------------


class Fault(Protocol):
    name: str
    port: int  # where clients connect

    def inject(self) -> None: ...
    def restore(self) -> None: ...
    def close(self) -> None: ...


class BlackholeFault:
    name = "blackhole"

    def __init__(self) -> None:
        self.server = RedisServer().start()
        self.proxy = FaultProxy(self.server.host, self.server.port).start()
        self.port = self.proxy.port

    def inject(self) -> None:
        self.proxy.set_mode("blackhole")

    def restore(self) -> None:
        self.proxy.set_mode("pass")

    def close(self) -> None:
        self.proxy.stop()
        self.server.stop()


class KillFault:
    name = "kill"

    def __init__(self) -> None:
        # start() after kill() brings it back on the same port.
        self.server = RedisServer().start()
        self.port = self.server.port

    def inject(self) -> None:
        self.server.kill()

    def restore(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.stop()


# -- the library's timeline ---------------------------------------------------------------


@dataclass
class Call:
    ms: float
    outcome: str
    breaker: str


@dataclass
class Timeline:
    fault: str
    first: list[Call] = field(default_factory=list)
    transitions: list[tuple[float, str]] = field(default_factory=list)
    calls_during_fault: int = 0
    restore_ms: float = 0.0
    to_first_success_ms: float | None = None
    failed_after_restore: int = 0


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, RedisUnavailable):
        return f"RedisUnavailable({exc.reason})"
    return type(exc).__name__


def library_timeline(fault: Fault, *, hold: float, recover_cap: float) -> Timeline:
    tl = Timeline(fault.name)
    t_fault = 0.0

    def on_event(event: Event) -> None:
        if isinstance(event, BreakerTransitioned) and t_fault:
            tl.transitions.append(
                (
                    (time.monotonic() - t_fault) * 1000,
                    f"{event.previous.value} -> {event.new.value} ({event.reason})",
                )
            )

    client = redis.Redis(host=HOST, port=fault.port)
    res = Resilience(client, hooks=[on_event])

    def call() -> tuple[float, BaseException | None]:
        t = time.perf_counter()
        err: BaseException | None = None
        try:
            with res.request(deadline=DEADLINE) as h:
                h.get(KEY)
        except Exception as exc:
            err = exc
        return (time.perf_counter() - t) * 1000, err

    for _ in range(20):
        ms, err = call()
        if err is not None:
            raise SystemExit(f"warm-up call failed: {err!r}")

    fault.inject()
    t_fault = time.monotonic()
    while len(tl.first) < 10 or time.monotonic() - t_fault < hold:
        ms, err = call()
        if len(tl.first) < 10:
            tl.first.append(Call(ms, _outcome(err), res.breaker_state.value))
        tl.calls_during_fault += 1
        time.sleep(CALL_GAP)

    t0 = time.monotonic()
    fault.restore()
    t_restored = time.monotonic()
    tl.restore_ms = (t_restored - t0) * 1000
    while time.monotonic() - t_restored < recover_cap:
        ms, err = call()
        if err is None:
            tl.to_first_success_ms = (time.monotonic() - t_restored) * 1000
            break
        tl.failed_after_restore += 1
        time.sleep(CALL_GAP)
    res.close()
    client.close()
    return tl


# -- the anchor: plain redis-py ------------------------------------------------------------


@dataclass
class Anchor:
    fault: str
    seconds: float | None  # None: still blocked at the cap
    outcome: str


def anchor_first_call(fault: Fault, cap: float) -> Anchor:
    client = redis.Redis(host=HOST, port=fault.port)
    for _ in range(20):
        client.get(KEY)
    box: dict[str, Any] = {}

    def first_call() -> None:
        t = time.monotonic()
        try:
            client.get(KEY)
            box["outcome"] = "ok"
        except Exception as exc:
            box["outcome"] = type(exc).__name__
        box["seconds"] = time.monotonic() - t

    fault.inject()
    thread = threading.Thread(target=first_call, name="anchor", daemon=True)
    thread.start()
    thread.join(cap)
    if thread.is_alive():
        return Anchor(fault.name, None, "still blocked")
    client.close()
    return Anchor(fault.name, box["seconds"], box["outcome"])


# -- output ---------------------------------------------------------------------------------


def print_timeline(tl: Timeline) -> None:
    print(f"### library defaults, fault = {tl.fault}: first 10 calls after the fault\n")
    rows = [[i + 1, f"{c.ms:.2f}", c.outcome, c.breaker] for i, c in enumerate(tl.first)]
    print(table(["call", "wall ms", "outcome", "breaker after"], rows) + "\n")
    print("Breaker transitions (ms after the fault):\n")
    for at, what in tl.transitions:
        print(f"- {at:.0f} ms: {what}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short holds, anchor capped at 3 s (< 20 s)")
    parser.add_argument("--skip-anchor", action="store_true", help="skip the plain redis-py anchor")
    args = parser.parse_args()
    hold = 2.0 if args.quick else 5.0
    cap = 3.0 if args.quick else 70.0
    # The library logs breaker transitions at WARNING; they are shown from a hook instead.
    logging.getLogger("otel_redis_resilience").setLevel(logging.ERROR)

    started = time.monotonic()
    timelines: list[Timeline] = []
    for make in (BlackholeFault, KillFault):
        fault: Fault = make()
        try:
            timelines.append(library_timeline(fault, hold=hold, recover_cap=30.0))
        finally:
            fault.close()

    anchors: list[Anchor] = []
    if not args.skip_anchor:
        for make in (BlackholeFault, KillFault):
            fault = make()
            try:
                anchors.append(anchor_first_call(fault, cap))
            finally:
                fault.close()

    print("## outage_timeline: a sync caller during a Redis outage\n")
    print(
        f"Library: default RetryPolicy/BreakerPolicy, `res.request(deadline={DEADLINE})` per call, "
        f"one GET per call, {CALL_GAP * 1000:.0f} ms between calls, fault held >= {hold:.0f} s.\n"
    )
    for tl in timelines:
        print_timeline(tl)
    print("### recovery\n")
    rows = []
    for tl in timelines:
        first = "not within 30 s" if tl.to_first_success_ms is None else f"{tl.to_first_success_ms:.0f} ms"
        rows.append(
            [tl.fault, tl.calls_during_fault, f"{tl.restore_ms:.0f} ms", first, tl.failed_after_restore]
        )
    print(
        table(
            [
                "fault",
                "calls during fault",
                "restore took",
                "restore -> first success",
                "failed calls after restore",
            ],
            rows,
        )
        + "\n"
    )
    if anchors:
        print(f"### anchor: plain `redis.Redis(host, port)`, redis-py {redis.__version__} defaults\n")
        rows = []
        for a in anchors:
            took = f">{cap:.0f} s" if a.seconds is None else f"{a.seconds * 1000:.0f} ms"
            rows.append([a.fault, took, a.outcome])
        print(table(["fault", "first call wall time", "outcome"], rows) + "\n")
    else:
        print("(anchor skipped: --skip-anchor)\n")
    print(f"(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
