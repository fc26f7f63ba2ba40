"""A worker process for the write-behind tests (run as ``python -m tests.integration.writebehind_worker``).

Modes:
- ``write``: with Redis down, make write-behind writes from several threads and
  print ``try <op> <key> <value>`` before and ``ack <op> <key> <value>`` after each
  one, flushed, so a test that SIGKILLs this process knows exactly which writes
  were acknowledged and which (at most one per thread) were in flight.
- ``replay``: open the journal (adopting what others left), wait until it is
  drained, print ``drained <pending>``.
- ``hold-lease``: journal ``--writes`` ``INCRBY counter 1`` entries, take the
  replay lease, print ``held``, then hold it until killed (a replayer that dies
  mid-run, as seen by the other processes sharing the journal).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import redis

from otel_redis_resilience import BreakerPolicy, Journaled, Resilience, RetryPolicy, WriteBehindConfig
from otel_redis_resilience._writebehind.store import Journal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["write", "replay", "hold-lease"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--name", default="p")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--writes", type=int, default=1000, help="per thread; 0 = until killed")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()

    if args.mode == "hold-lease":
        journal = Journal(WriteBehindConfig(args.dir))
        for _ in range(args.writes):
            journal.append(b"counter", (b"INCRBY", b"counter", 1))
        assert journal.try_acquire_lease()
        print("held", flush=True)
        sys.stdin.readline()
        return

    client = redis.Redis(host="127.0.0.1", port=args.port, socket_timeout=2, socket_connect_timeout=2)
    res = Resilience(
        client,
        retry=RetryPolicy(attempt_timeout=0.2, max_attempts=2),
        breaker=BreakerPolicy(failure_threshold=2, probe_interval=0.1, half_open_max_calls=1),
        write_behind=WriteBehindConfig(args.dir, fsync="normal", lease_seconds=1.0, max_entries=1_000_000),
    )
    out_lock = threading.Lock()

    if args.mode == "replay":
        journal = res.write_behind_journal
        end = time.monotonic() + args.timeout
        while time.monotonic() < end:
            res.replay_now()
            if journal.pending_count() == 0:
                break
            time.sleep(0.1)
        print(f"drained {journal.pending_count()}", flush=True)
        res.close()
        return

    def worker(t: int) -> None:
        i = 0
        while args.writes == 0 or i < args.writes:
            kind = i % 3
            if kind == 0:
                op, key, value = "incrby", f"counter:{t % 3}", str(1 + i % 5)
            elif kind == 1:
                op, key, value = "rpush", f"list:{args.name}:{t}", str(i)
            else:
                op, key, value = "set", f"set:{args.name}:{t}:{i}", f"v{i}"
            # Announced before the write: if this process is killed between the
            # journal's commit and the "ack" line, the test knows the write is in doubt.
            with out_lock:
                sys.stdout.write(f"try {op} {key} {value}\n")
                sys.stdout.flush()
            with res.request(deadline=1.0) as h:
                wb = h.write_behind()
                if op == "incrby":
                    out = wb.incrby(key, int(value))
                elif op == "rpush":
                    out = wb.rpush(key, value)
                else:
                    out = wb.set(key, value)
            if not isinstance(out, Journaled):
                print(f"error not journaled {out!r}", file=sys.stderr, flush=True)
                sys.exit(3)
            with out_lock:
                sys.stdout.write(f"ack {op} {key} {value}\n")
                sys.stdout.flush()
            i += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print("done", flush=True)
    res.close()


if __name__ == "__main__":
    main()
