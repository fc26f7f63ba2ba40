"""The library's logger, and log lines that must not leak what a traceback quotes."""

from __future__ import annotations

import logging

from .redact import stacktrace

logger = logging.getLogger("otel_redis_resilience")


def debug_traceback(msg: str, exc: BaseException | None) -> None:
    """``logger.debug(msg, exc_info=exc)``, with the traceback redacted.

    A plain exc_info traceback ends with the exception's message (and its chained
    exceptions'), which may quote a key or a value. Handlers that print ``exc_text`` (the
    standard Formatter does) show the redacted one.
    """
    if exc is None or not logger.isEnabledFor(logging.DEBUG):
        return
    record = logger.makeRecord(logger.name, logging.DEBUG, __file__, 0, msg, (), None)
    record.exc_text = stacktrace(exc).rstrip("\n")
    logger.handle(record)


def hook_name(hook: object) -> str:
    """A hook's name for a log line."""
    # Not repr(): a partial or a configured object shows its arguments, credentials included.
    name = getattr(hook, "__qualname__", None)
    if not isinstance(name, str):
        name = type(hook).__qualname__
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return f"{module}.{name}" if isinstance(module, str) else name
