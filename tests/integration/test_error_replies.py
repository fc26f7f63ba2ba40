"""The error-reply table (issue 9, point 5), against real redis-servers put into each state.

| reply                     | evidence | retried | caller gets                              | write_behind() |
|---------------------------|----------|---------|------------------------------------------|----------------|
| LOADING, BUSY, MASTERDOWN | yes      | yes     | RedisUnavailable(retries_exhausted or    | journaled      |
|                           |          |         | deadline_exceeded), reply as __cause__   |                |
| TRYAGAIN, CLUSTERDOWN     | no       | yes     | same                                     | journaled      |
| READONLY, OOM, MISCONF,   | no       | no      | RedisUnavailable("write_refused",        | journaled      |
| NOREPLICAS                |          |         | outcome_unknown=False), cause chained    |                |
| NOAUTH, WRONGPASS, NOPERM | no       | no      | redis-py's error unchanged               | raised, not    |
|                           |          |         | (AuthenticationError, NoPermissionError) | journaled      |

The states are built by :mod:`testbed.server_states` (see its table). TRYAGAIN only
answers multi-key commands (an MGET during a slot migration), which ``write_behind()``
does not take, so its write-behind column is not exercised.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    BreakerTransitioned,
    Journaled,
    RedisUnavailable,
    RetryPolicy,
    RetryScheduled,
    WriteBehindConfig,
)
from testbed.server_states import STATES, ServerState, reply_code
from tests.support import Runner

pytestmark = pytest.mark.slow

# code: (breaker evidence, retried, what the caller gets, what write_behind() does)
ROWS: dict[str, tuple[bool, bool, str, str]] = {
    "LOADING": (True, True, "unavailable", "journaled"),
    "BUSY": (True, True, "unavailable", "journaled"),
    "MASTERDOWN": (True, True, "unavailable", "journaled"),
    "TRYAGAIN": (False, True, "unavailable", "journaled"),
    "CLUSTERDOWN": (False, True, "unavailable", "journaled"),
    "READONLY": (False, False, "write_refused", "journaled"),
    "OOM": (False, False, "write_refused", "journaled"),
    "MISCONF": (False, False, "write_refused", "journaled"),
    "NOREPLICAS": (False, False, "write_refused", "journaled"),
    "NOAUTH": (False, False, "unchanged", "raised"),
    "WRONGPASS": (False, False, "unchanged", "raised"),
    "NOPERM": (False, False, "unchanged", "raised"),
}

#: The redis-py error a caller gets unchanged.
UNCHANGED: dict[str, type[Exception]] = {
    "NOAUTH": redis.exceptions.AuthenticationError,
    "WRONGPASS": redis.exceptions.AuthenticationError,
    "NOPERM": redis.exceptions.NoPermissionError,
}

MODES = ["sync", "async"]


@pytest.fixture(params=list(ROWS))
def state(request: pytest.FixtureRequest) -> Iterator[ServerState]:
    with STATES[request.param]() as st:
        yield st


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _runner(st: ServerState, mode: str, **res_kw: Any) -> Runner:
    res_kw.setdefault("retry", RetryPolicy(max_attempts=3, attempt_timeout=2.0))
    return Runner(mode, st.host, st.port, client_kw=dict(st.client_kw), **res_kw)


def _call(runner: Runner, method: str, args: tuple[Any, ...]) -> Any:
    try:
        return runner.call(method, *args, deadline=5)
    except Exception as e:
        return e


def _cause_code(exc: BaseException) -> str | None:
    cause = exc.__cause__
    return reply_code(cause) if cause is not None else None


def _opened(runner: Runner) -> bool:
    return any(e.new is BreakerState.OPEN for e in runner.recorder.of(BreakerTransitioned))


def test_breaker_evidence(state: ServerState, mode: str) -> None:
    evidence, _, _, _ = ROWS[state.code]
    runner = _runner(state, mode, breaker=BreakerPolicy(failure_threshold=2))
    try:
        method, args = state.write
        results = [_call(runner, method, args) for _ in range(10)]
        assert state.still_on(), f"the {state.code} state ended during the test"
        kinds = sorted({type(r).__name__ for r in results})
        if evidence:
            assert _opened(runner), f"{state.code} must open the breaker (threshold 2); 10 calls got {kinds}"
        else:
            assert not _opened(runner), (
                f"{state.code} is no evidence against Redis: the breaker must stay closed over 10 calls; "
                f"transitions {runner.recorder.of(BreakerTransitioned)}, results {kinds}"
            )
            assert runner.res.breaker_state is BreakerState.CLOSED
        if state.read is not None:
            # The server still serves reads: they keep working through the same handle.
            for _ in range(5):
                got = _call(runner, *state.read)
                assert not isinstance(got, Exception), (
                    f"a read on the {state.code} server after 10 failed writes failed: {got!r}"
                )
            assert runner.res.breaker_state is BreakerState.CLOSED
    finally:
        runner.close()


def test_retried_and_what_the_caller_gets(state: ServerState, mode: str) -> None:
    _, retried, gets, _ = ROWS[state.code]
    runner = _runner(state, mode)
    try:
        method, args = state.write
        got = _call(runner, method, args)
        retries = len(runner.recorder.of(RetryScheduled))
        assert isinstance(got, Exception), f"{method}{args} on a {state.code} server answered {got!r}"
        if gets == "unchanged":
            assert not isinstance(got, RedisUnavailable), (
                f"{state.code}: the caller must get redis-py's error unchanged, got {got!r} "
                f"(cause {got.__cause__!r})"
            )
            assert isinstance(got, UNCHANGED[state.code]), f"{state.code}: got {type(got)} {got!r}"
            assert retries == 0, f"{state.code} must not be retried; {retries} retries"
            return
        assert isinstance(got, RedisUnavailable), f"{state.code}: expected RedisUnavailable, got {got!r}"
        assert _cause_code(got) == state.code, (
            f"{state.code}: the error reply must be chained as __cause__, got {got.__cause__!r}"
        )
        assert got.outcome_unknown is False, f"{state.code}: the command did not run, {got!r}"
        if gets == "write_refused":
            assert got.reason == "write_refused", f"{state.code}: reason {got.reason!r}, {got!r}"
        else:
            assert got.reason in ("retries_exhausted", "deadline_exceeded"), f"{state.code}: {got!r}"
        if retried:
            assert got.attempts == 3, f"{state.code} must be retried: {got.attempts} attempts"
            assert retries == 2, f"{state.code}: {retries} retries"
        else:
            assert got.attempts == 1, f"{state.code} must not be retried: {got.attempts} attempts ({got!r})"
            assert retries == 0, f"{state.code}: {retries} retries"
    finally:
        runner.close()


def _write_behind(runner: Runner, method: str, args: tuple[Any, ...]) -> Any:
    if runner.loop is None:
        with runner.res.request(deadline=5) as h:
            try:
                return getattr(h.write_behind(), method)(*args)
            except Exception as e:
                return e

    async def go() -> Any:
        async with runner.res.request(deadline=5) as h:
            try:
                return await getattr(h.write_behind(), method)(*args)
            except Exception as e:
                return e

    return runner.loop.run_until_complete(go())


@pytest.fixture
def wb_state(request: pytest.FixtureRequest) -> Iterator[ServerState]:
    with STATES[request.param]() as st:
        yield st


@pytest.mark.parametrize("wb_state", [c for c in ROWS if c != "TRYAGAIN"], indirect=True)
def test_write_behind(wb_state: ServerState, mode: str, tmp_path: Path) -> None:
    st = wb_state
    _, _, _, expected = ROWS[st.code]
    assert st.write_behind_capable
    runner = _runner(st, mode, write_behind=WriteBehindConfig(directory=str(tmp_path / "wb"), fsync="off"))
    try:
        method, args = st.write
        got = _write_behind(runner, method, args)
        journal = runner.res.write_behind_journal
        if expected == "journaled":
            assert isinstance(got, Journaled), f"{st.code}: write_behind().{method} must journal, got {got!r}"
        else:
            assert not isinstance(got, RedisUnavailable), f"{st.code}: must be unchanged, got {got!r}"
            assert isinstance(got, UNCHANGED[st.code]), f"{st.code}: write_behind() raised {got!r}"
            assert journal.pending_count() == 0, f"{st.code}: the write was journaled"
    finally:
        runner.close()
