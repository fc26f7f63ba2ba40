"""Fallbacks: the decorator, outage-as-miss reads and last-known-good reads.

Only unavailability is ever turned into a fallback. An error reply (WRONGTYPE,
a syntax error...) is the caller's bug and always propagates.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._decide.commands import READ_COMMANDS, miss_reply
from ._decide.config import _int_at_least
from ._drive.classify import fallback_reason
from ._errors import ConfigurationError, RedisUnavailable
from ._scope import current_scope

if TYPE_CHECKING:
    from ._observe.telemetry import Telemetry

F = TypeVar("F", bound=Callable[..., Any])
_MISSING: Any = object()


def unavailability_reason(exc: BaseException) -> str | None:
    """The fallback reason for an error, or None if it must not fall back.

    The library's own verdict gives its reason; redis-py's errors are sorted by the
    one classifier (``_drive/classify.py``), so a fallback and a retry agree on what
    is an outage.
    """
    if isinstance(exc, RedisUnavailable):
        return exc.reason
    return fallback_reason(exc)


def make_fallback_decorator(
    telemetry: Telemetry, *, value: Any = _MISSING, func: Callable[..., Any] | None = None
) -> Callable[[F], F]:
    if (value is _MISSING) == (func is None):
        raise ConfigurationError("fallback() takes exactly one of value=... or func=...")
    if func is not None and not callable(func):
        raise ConfigurationError(f"fallback(func=...) must be callable, got {func!r}")
    kind = "value" if func is None else "function"
    func_is_async = func is not None and inspect.iscoroutinefunction(func)

    def decorate(fn: F) -> F:
        name = getattr(fn, "__qualname__", "fallback")

        def fall_back(exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            """The fallback result (a coroutine for an async ``func``), or re-raise ``exc``."""
            reason = unavailability_reason(exc)
            if reason is None:
                raise exc
            telemetry.fallback(name, kind, reason, current_scope())
            return value if func is None else func(*args, **kwargs)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    result = fall_back(exc, args, kwargs)
                    return await result if func_is_async else result

            return cast(F, async_wrapper)
        if func_is_async:
            raise ConfigurationError(
                f"fallback(func={func!r}) is a coroutine function but {name} is not: use a plain function"
            )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                return fall_back(exc, args, kwargs)

        return cast(F, wrapper)

    return decorate


@dataclass(frozen=True, slots=True, kw_only=True)
class LastKnownGoodPolicy:
    """Bounds of the in-process copy of recent successful reads.

    Args:
        max_entries: Most replies kept (least recently used go first).
        max_bytes: Most bytes kept, by an estimate of each key and reply.
        max_entry_bytes: Replies larger than this are never kept.
    """

    max_entries: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    max_entry_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        _int_at_least("LastKnownGoodPolicy", "max_entries", self.max_entries, 1)
        _int_at_least("LastKnownGoodPolicy", "max_bytes", self.max_bytes, 1)
        _int_at_least("LastKnownGoodPolicy", "max_entry_bytes", self.max_entry_bytes, 1)
        if self.max_entry_bytes > self.max_bytes:
            raise ConfigurationError("LastKnownGoodPolicy.max_entry_bytes must be <= max_bytes")


def _size(value: Any) -> int:
    if isinstance(value, bytes | str | bytearray):
        return len(value) + 40
    if isinstance(value, dict):
        return 64 + sum(_size(k) + _size(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return 56 + sum(_size(v) for v in value)
    return sys.getsizeof(value)


class LastKnownGood:
    """A bounded LRU of recent successful read replies, keyed by the whole command."""

    def __init__(self, policy: LastKnownGoodPolicy) -> None:
        self.policy = policy
        self._data: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, key: tuple[Any, ...], value: Any) -> None:
        size = _size(key) + _size(value)
        policy = self.policy
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > policy.max_entry_bytes:
                return
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > policy.max_entries or self._bytes > policy.max_bytes:
                _, (_, dropped) = self._data.popitem(last=False)
                self._bytes -= dropped

    def get(self, key: tuple[Any, ...]) -> Any:
        with self._lock:
            found = self._data.get(key)
            if found is None:
                return _MISSING
            self._data.move_to_end(key)
            return found[0]


MISSING = _MISSING


#: Handle modes (a class attribute on plain handles, set on views).
NORMAL, MISS, STALE, WRITE_BEHIND = 0, 1, 2, 3

__all__ = ["MISS", "NORMAL", "STALE", "WRITE_BEHIND", "LastKnownGood", "LastKnownGoodPolicy", "miss_reply"]


def lkg_key(args: Sequence[Any], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """A hashable key for a command and the options that shape its reply, or None."""
    # redis-py passes ``keys=[...]`` for client-side caching; it repeats the args.
    extra = [(k, v) for k, v in options.items() if k != "keys"]
    if not extra:
        return tuple(args)
    try:
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in extra))
        hash(frozen)
    except TypeError:
        return None
    return (*args, frozen)


def recover(
    mode: int,
    lkg: LastKnownGood | None,
    telemetry: Telemetry,
    name: str,
    args: Sequence[Any],
    options: dict[str, Any],
    exc: Exception,
    scope: Any,
    *,
    decode: bool = False,
) -> Any:
    """The fallback reply of a read in a degraded mode, or re-raise ``exc``."""
    reason = unavailability_reason(exc)
    if reason is None or name not in READ_COMMANDS:
        raise exc
    if mode == STALE and lkg is not None:
        key = lkg_key(args, options)
        found = MISSING if key is None else lkg.get(key)
        if found is not MISSING:
            telemetry.fallback(name, "last_known_good", reason, scope, stale=True)
            return found
    telemetry.fallback(name, "miss", reason, scope)
    return miss_reply(name, args, decode=decode)


def remember(
    lkg: LastKnownGood | None, name: str, args: Sequence[Any], options: dict[str, Any], result: Any
) -> None:
    if lkg is not None and name in READ_COMMANDS:
        key = lkg_key(args, options)
        if key is not None:
            lkg.put(key, result)
