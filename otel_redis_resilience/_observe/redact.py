"""Exception text made safe for telemetry: no key, value or password can get through.

Redis quotes a command's arguments in its error replies (``unknown command 'X', with args
beginning with: 'key' 'value'``), redis-py lists a failed pipeline command with its
arguments, and a module or a Lua script may say anything at all. Cutting such text at the
first quote is not enough (a module may write ``key k1 not found``), so nothing of it is
passed through: a reply becomes its error code plus, for replies this module knows, a
fixed wording from the table below; any other exception text becomes a fixed phrase found
in it, or nothing. Output is built only from the tables and from shapes checked here (an
upper-case code, a pipeline command number), so even a message crafted to look like
something else cannot smuggle a value out.

Everything here runs only on the error path, and only when something will record it.
"""

from __future__ import annotations

import re
import types

import redis.exceptions as rexc

from .._drive.classify import KNOWN_CODES
from .._errors import RedisUnavailable

# A server's error code: the first word of its reply, upper case (WRONGTYPE, NOSCRIPT...).
_CODE = re.compile(r"[A-Z][A-Z0-9_]{1,31}\Z")
_PIPELINE = re.compile(r"Command # (\d{1,9}) \(")
_PIPELINE_SEP = ") of pipeline caused error: "

# (how the server's text starts, what we say). The server's own words, cut before the
# first place it would put an argument.
_REPLY_TEXTS: tuple[tuple[str, str], ...] = tuple(
    (t, t) if isinstance(t, str) else t
    for t in (
        "unknown command",
        "unknown subcommand",
        "syntax error",
        "wrong number of arguments",
        "value is not an integer or out of range",
        "value is not a valid float",
        "increment or decrement would overflow",
        "increment would produce NaN or Infinity",
        "hash value is not an integer",
        "hash value is not a float",
        "bit offset is not an integer or out of range",
        "bit is not an integer or out of range",
        "string exceeds maximum allowed size",
        "offset is out of range",
        "index out of range",
        "no such key",
        "invalid expire time",
        "invalid DB index",
        "DB index is out of range",
        "source and destination objects are the same",
        "timeout is not a float or out of range",
        "timeout is negative",
        "min or max is not a float",
        "min or max not valid string range item",
        "Protocol error",
        "max number of clients reached",
        "invalid password",
        "EXEC without MULTI",
        "DISCARD without MULTI",
        "MULTI calls can not be nested",
        "WATCH inside MULTI is not allowed",
        "Error running script",
        "Error compiling script",
        (
            "AUTH <password> called without any password configured",
            "AUTH called without a password configured",
        ),
        "Client sent AUTH, but no password is set",
        "Operation against a key holding the wrong kind of value",
        "No matching script",
        "command not allowed when used memory",
        "Transaction discarded because of previous errors",
        "Redis is loading the dataset in memory",
        "Redis is busy running a script",
        "You can't write against a read only replica",
        "Authentication required",
        "HELLO must be called with the client already authenticated",
        "invalid username-password pair or user is disabled",
        "this user has no permissions",
        "Redis is configured to save RDB snapshots",
        "Target key name already exists",
        "Consumer Group name already exists",
        ("No such key", "No such key or consumer group"),
        "Link with MASTER is down",
        "Not enough good replicas to write",
        "Keys in request don't hash to the same slot",
        "The cluster is down",
        "Multiple keys request during rehashing of slot",
        "No scripts in execution right now",
    )
)

# Errors that are not replies (connection, timeout, protocol) are written by redis-py or the
# OS: a phrase found anywhere in them, first match wins (specific before general).
_OTHER_TEXTS = (
    "Connection refused",
    "Connection reset by peer",
    "Connection closed by server",
    "Broken pipe",
    "Name or service not known",
    "No route to host",
    "Network is unreachable",
    "Timeout reading from socket",
    "Timeout writing to socket",
    "Timeout connecting to server",
    "Too many connections",
    "No connection available",
    "Connection not ready",
    "Connection has data",
    "Bad response from PING health check",
    "Invalid Username or Password",
    "Invalid Database",
    "Invalid RESP version",
    "Error setting client name",
    "Protocol Error",
    "Error while reading from socket",
    "timed out",
)

_PUBLIC_MODULES = {"redis.exceptions", "otel_redis_resilience"}
_MAX_FRAMES = 64
_MAX_CHAIN = 5


def public_type(exc: BaseException) -> str:
    """The exception's class as users import it: ``redis.exceptions.ResponseError``."""
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith("otel_redis_resilience.") and "." not in cls.__qualname__:
        # Every public class of ours is re-exported from the package.
        module = "otel_redis_resilience"
    return f"{module}.{cls.__qualname__}"


def _reply_text(code: str, text: str) -> str:
    for start, say in _REPLY_TEXTS:
        if text.startswith(start):
            return f"{code} {say}"
    return code


def _reply(exc: BaseException, text: str) -> tuple[str | None, str] | None:
    """(code, what may be said) for an error reply; None if ``exc`` is not one."""
    status = getattr(exc, "status_code", None)
    code = status if isinstance(status, str) and _CODE.match(status) else None
    m = _PIPELINE.match(text)
    if m is not None:
        # redis-py: "Command # N (<the command, arguments and all>) of pipeline caused error: <reply>"
        # (asyncio puts the reply's args tuple there: "('WRONGTYPE ...',)").
        head = f"Command # {int(m.group(1))} of pipeline caused error"
        cut = text.rfind(_PIPELINE_SEP)
        inner = text[cut + len(_PIPELINE_SEP) :].lstrip("('\"") if cut >= 0 else ""
        if code is None:
            word = inner.split(" ", 1)[0]
            if word in KNOWN_CODES:
                code, inner = word, inner[len(word) + 1 :]
        elif inner.startswith(code + " "):
            inner = inner[len(code) + 1 :]
        return code, f"{head}: {_reply_text(code, inner)}" if code else head
    if code is None and isinstance(exc, rexc.ResponseError):
        word, _, rest = text.partition(" ")
        # A script's error_reply() can start with anything, a key included.
        if word in KNOWN_CODES:
            code, text = word, rest
    if code is None:
        return None
    return code, _reply_text(code, text)


def error_message(exc: BaseException) -> str:
    """What may be said of ``exc``: e.g. ``ERR unknown command``; may be empty."""
    if isinstance(exc, RedisUnavailable):
        # Our own message, rebuilt from its parts rather than trusted as text.
        msg = f"Redis unavailable ({exc.reason})"
        if exc.operation:
            n = exc.attempts
            msg += f" for {exc.operation} after {n} attempt{'s' if n != 1 else ''}"
        cause = exc.__cause__
        if cause is not None:
            reply = _reply(cause, _text(cause))
            code = reply[0] if reply is not None else None
            msg += f": {code or type(cause).__name__}"
        return msg
    text = _text(exc)
    reply = _reply(exc, text)
    if reply is not None:
        return reply[1]
    for phrase in _OTHER_TEXTS:
        if phrase in text:
            return phrase
    return ""


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return ""


def _frames(tb: types.TracebackType | None) -> list[str]:
    # File, line and function only: source lines are read from disk, and a caller's line
    # may hold a literal key or password.
    lines = []
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}\n')
        tb = tb.tb_next
    return lines[-_MAX_FRAMES:]


def stacktrace(exc: BaseException) -> str:
    """A traceback in Python's layout, with every message replaced by :func:`error_message`.

    Causes and contexts are followed as Python prints them, since a chained exception's
    message would otherwise be the way a value gets in.
    """
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = (
                current.__cause__,
                "The above exception was the direct cause of the following exception:",
            )
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = (
                current.__context__,
                "During handling of the above exception, another exception occurred:",
            )
        else:
            current = None
    out: list[str] = []
    for e, link_to_next in reversed(chain):
        frames = _frames(e.__traceback__)
        if frames:
            out.append("Traceback (most recent call last):\n")
            out.extend(frames)
        msg = error_message(e)
        out.append(f"{public_type(e)}: {msg}\n" if msg else f"{public_type(e)}\n")
        if link_to_next:
            out.append(f"\n{link_to_next}\n\n")
    return "".join(out)


def exception_attributes(exc: BaseException) -> dict[str, str]:
    """The ``exception`` span event's attributes (what ``Span.record_exception`` would set, redacted)."""
    attrs = {"exception.type": public_type(exc)}
    msg = error_message(exc)
    if msg:
        attrs["exception.message"] = msg
    attrs["exception.stacktrace"] = stacktrace(exc)
    return attrs
