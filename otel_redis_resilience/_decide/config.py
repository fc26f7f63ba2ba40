"""Policies: immutable, validated at construction."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import ConfigurationError

#: The smallest duration, in seconds, accepted for anything that bounds or judges one
#: round trip to Redis (``attempt_timeout``, ``probe_timeout``, ``probe_interval``,
#: ``slow_call_threshold``) and for deadlines. Below it nothing can succeed: the core
#: starts no attempt with less than 2 ms left, and the asyncio watchdog checks attempts
#: every 2 ms, so a smaller value only ever times out (or, for a slow-call threshold,
#: counts every healthy reply as a failure) and opens the breaker on a healthy Redis.
MIN_DURATION = 0.005

#: What a probe may take when ``BreakerPolicy.probe_timeout`` is not given (capped by
#: ``probe_interval``).
DEFAULT_PROBE_TIMEOUT = 0.25


def _positive(owner: str, name: str | None, value: float, *, allow_zero: bool = False) -> None:
    label = owner if name is None else f"{owner}.{name}"
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigurationError(f"{label} must be a number, got {value!r}")
    if math.isinf(value):
        raise ConfigurationError(f"{label} must be finite, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{label} must be {bound}, got {value!r}")


def _duration(owner: str, name: str | None, value: float) -> None:
    """A finite number of seconds, at least :data:`MIN_DURATION`."""
    _positive(owner, name, value)
    if value < MIN_DURATION:
        label = owner if name is None else f"{owner}.{name}"
        raise ConfigurationError(
            f"{label} must be >= {MIN_DURATION} s, got {value!r} (shorter than one attempt can take)"
        )


def _int_at_least(owner: str, name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{owner}.{name} must be an integer, got {value!r}")
    if value < low:
        raise ConfigurationError(f"{owner}.{name} must be >= {low}, got {value!r}")


def _fraction(owner: str, name: str, value: float, *, allow_zero: bool) -> None:
    _positive(owner, name, value, allow_zero=allow_zero)
    if value > 1:
        raise ConfigurationError(f"{owner}.{name} must be a fraction in (0, 1], got {value!r}")


def _collection(name: str, value: object, what: str) -> None:
    if isinstance(value, str | bytes):
        raise ConfigurationError(
            f"RetryPolicy.{name} must be a collection of {what}, not a single "
            f"{'string' if name == 'idempotent_commands' else 'one'}: got {value!r}"
        )
    if not isinstance(value, Iterable):
        raise ConfigurationError(f"RetryPolicy.{name} must be a collection of {what}, got {value!r}")


def _normalise_commands(value: Iterable[str]) -> frozenset[str]:
    _collection("idempotent_commands", value, "command names")
    out = set()
    for name in value:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"RetryPolicy.idempotent_commands has an invalid entry {name!r}")
        out.add(" ".join(name.split()).upper())
    return frozenset(out)


def _normalise_scripts(value: Iterable[str | bytes]) -> frozenset[str]:
    _collection("idempotent_scripts", value, "scripts or SHA1 digests")
    out = set()
    for script in value:
        if isinstance(script, bytes):
            try:
                script = script.decode()
            except UnicodeDecodeError:
                raise ConfigurationError(
                    f"RetryPolicy.idempotent_scripts has an invalid entry {script!r} "
                    "(bytes that are not UTF-8: give the Lua source as text or UTF-8 bytes, or its SHA1)"
                ) from None
        if not isinstance(script, str) or not script:
            raise ConfigurationError(f"RetryPolicy.idempotent_scripts has an invalid entry {script!r}")
        is_sha = len(script) == 40 and all(c in "0123456789abcdefABCDEF" for c in script)
        # Scripts are declared by source or by digest; EVALSHA carries only the digest.
        out.add(script.lower() if is_sha else hashlib.sha1(script.encode()).hexdigest())
    return frozenset(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How failed attempts are retried.

    Args:
        max_attempts: Total attempts per operation, the first one included.
            ``1`` turns retries off. The wrapped client's own retries are
            switched off, so this is exactly the number of times a command can
            reach the server.
        backoff_base: Upper bound of the first backoff, in seconds. Backoff is
            exponential with full jitter: the n-th retry sleeps a uniformly
            random time in ``[0, min(backoff_cap, backoff_base * 2**(n-1))]``.
        backoff_cap: Upper bound of any one backoff, in seconds.
        budget_ratio: Retries allowed, as a fraction of operations started in
            the last ``budget_window`` seconds (process-wide, per ``Resilience``).
        budget_min_per_second: A floor of retries per second always allowed, so
            a quiet process can still retry.
        budget_window: Seconds of history the retry budget looks at.
        attempt_timeout: Seconds one attempt may take (connect, handshake, send
            and reply together; at least :data:`MIN_DURATION`), or ``None`` to
            rely on the client's ``socket_timeout`` alone. Always further capped by the request's
            deadline. Blocking commands (``BLPOP 5``...) get their block time
            on top.
        idempotent_commands: Extra command names that are safe to send twice
            (added to the built-in table).
        idempotent_scripts: Lua scripts (source or SHA1) that are safe to run
            twice, so ``EVAL``/``EVALSHA`` of them may be retried.
    """

    max_attempts: int = 3
    backoff_base: float = 0.025
    backoff_cap: float = 0.5
    budget_ratio: float = 0.2
    budget_min_per_second: float = 5.0
    budget_window: float = 10.0
    attempt_timeout: float | None = 0.5
    idempotent_commands: frozenset[str] = field(default_factory=frozenset)
    idempotent_scripts: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        o = "RetryPolicy"
        _int_at_least(o, "max_attempts", self.max_attempts, 1)
        _positive(o, "backoff_base", self.backoff_base, allow_zero=True)
        _positive(o, "backoff_cap", self.backoff_cap, allow_zero=True)
        if self.backoff_cap < self.backoff_base:
            raise ConfigurationError(
                f"RetryPolicy.backoff_cap ({self.backoff_cap}) must be >= backoff_base ({self.backoff_base})"
            )
        _positive(o, "budget_ratio", self.budget_ratio, allow_zero=True)
        _positive(o, "budget_min_per_second", self.budget_min_per_second, allow_zero=True)
        _positive(o, "budget_window", self.budget_window)
        if self.attempt_timeout is not None:
            _duration(o, "attempt_timeout", self.attempt_timeout)
        object.__setattr__(self, "idempotent_commands", _normalise_commands(self.idempotent_commands))
        object.__setattr__(self, "idempotent_scripts", _normalise_scripts(self.idempotent_scripts))


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When the circuit breaker opens and how it recovers.

    Args:
        failure_threshold: Consecutive failed attempts that open the breaker.
        failure_rate_threshold: Failure fraction over the rolling ``window``
            that opens the breaker once ``minimum_calls`` attempts were seen.
        minimum_calls: Attempts in the window before the rate is trusted.
        window: Length of the rolling window, seconds.
        reset_timeout: Seconds the breaker stays open before letting trial
            calls through (half-open), if the background probe has not already
            seen Redis answer.
        half_open_max_calls: Trial calls allowed at once while half-open; this
            many successes close the breaker, one failure re-opens it.
        slow_call_threshold: Seconds after which a successful attempt counts
            as a failure (a Redis that answers in 2 s is down for a web app),
            or ``None`` to disable.
        probe_interval: Seconds between background health probes (a ``PING``)
            while open, or ``None`` to disable probes and wait ``reset_timeout``.
        probe_timeout: Seconds a probe may take, at most ``probe_interval``
            (default: 0.25 s, or ``probe_interval`` if that is shorter).
        evidence_floor: An attempt that timed out counts against the breaker
            only if it was given at least this long (or its whole
            ``attempt_timeout``). A caller whose own deadline left it 3 ms is
            no evidence that Redis is down; a healthy Redis answers well within
            this floor.
    """

    failure_threshold: int = 5
    failure_rate_threshold: float = 0.5
    minimum_calls: int = 20
    window: float = 10.0
    reset_timeout: float = 30.0
    half_open_max_calls: int = 3
    slow_call_threshold: float | None = None
    probe_interval: float | None = 0.5
    probe_timeout: float | None = None
    evidence_floor: float = 0.05

    def __post_init__(self) -> None:
        o = "BreakerPolicy"
        _int_at_least(o, "failure_threshold", self.failure_threshold, 1)
        _fraction(o, "failure_rate_threshold", self.failure_rate_threshold, allow_zero=False)
        _int_at_least(o, "minimum_calls", self.minimum_calls, 1)
        _positive(o, "window", self.window)
        _positive(o, "reset_timeout", self.reset_timeout)
        _int_at_least(o, "half_open_max_calls", self.half_open_max_calls, 1)
        if self.slow_call_threshold is not None:
            _duration(o, "slow_call_threshold", self.slow_call_threshold)
        interval = self.probe_interval
        if interval is not None:
            _duration(o, "probe_interval", interval)
        if self.probe_timeout is None:
            default = DEFAULT_PROBE_TIMEOUT if interval is None else min(DEFAULT_PROBE_TIMEOUT, interval)
            object.__setattr__(self, "probe_timeout", default)
        else:
            _duration(o, "probe_timeout", self.probe_timeout)
            # One PING per interval: a probe allowed longer than the interval would stretch
            # the interval against a hung Redis, and hide that the two were mixed up.
            if interval is not None and self.probe_timeout > interval:
                raise ConfigurationError(
                    f"BreakerPolicy.probe_timeout ({self.probe_timeout}) must be <= "
                    f"probe_interval ({interval})"
                )
        _positive(o, "evidence_floor", self.evidence_floor)


def validate_request_deadline(owner: str, value: float | None) -> float | None:
    """Check a deadline given at run time (``request(deadline=...)``); no floor.

    A request's deadline is often computed from what its HTTP budget has left,
    so it may be tiny; it then gives up at once with ``deadline_exceeded``
    instead of failing the request with a configuration error.
    """
    if value is not None:
        _positive(owner, "deadline", value)
    return value


def validate_deadline(owner: str, value: float | None, *, field: str | None = "deadline") -> float | None:
    """Check a deadline in seconds (``None``: no deadline) and return it.

    Args:
        owner: Who the value belongs to, for the error message.
        value: The deadline.
        field: The field's name after ``owner`` in the message (``owner.deadline``);
            ``None`` when ``owner`` already names it.

    Raises:
        ConfigurationError: naming ``owner`` and the value when it is not a finite
            number of seconds >= :data:`MIN_DURATION`.
    """
    if value is not None:
        _duration(owner, field, value)
    return value
